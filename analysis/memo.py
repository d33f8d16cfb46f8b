"""A bounded, thread-safe memo of what the what-if analyses derived from routing segments.

Segments never change under their name (collector.store), so whatever was computed from a
set of them stays true while they are live; entries are keyed by what they were read from
and the least recently used go once their sizes (in the caller's units) pass the bound.
"""
from __future__ import annotations

import collections
import hashlib
import threading
from typing import Any


def segments_key(store, table: str, run: str) -> tuple:
    """What identifies the live segments of (table, run) in a memo key: small at any run size,
    and new whenever a segment is added, retired or removed."""
    paths = "\n".join(store.segment_paths(table, run))
    return str(getattr(store, "root", id(store))), run, table, hashlib.sha1(paths.encode()).hexdigest()


class BoundedMemo:
    def __init__(self, max_size: int):
        self.max_size = max_size
        self._entries: collections.OrderedDict[Any, tuple[Any, int]] = collections.OrderedDict()
        self._total = 0
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            hit = self._entries.get(key)
            if hit is None:
                return None
            self._entries.move_to_end(key)
            return hit[0]

    def put(self, key, value, size: int) -> None:
        """Keep value (dropped at once when larger than the bound), evicting the least recently used past it."""
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._total -= old[1]
            if size > self.max_size:
                return
            self._entries[key] = (value, size)
            self._total += size
            while self._total > self.max_size:
                _, (_, gone) = self._entries.popitem(last=False)
                self._total -= gone

    def pop(self, key) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._total -= old[1]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._total = 0

    def __len__(self) -> int:
        return len(self._entries)
