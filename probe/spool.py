"""Bounded on-disk spool: each frame a producer sent stays here until the store acks it.

One file per frame, named by its sequence number, written to a temporary name, fsynced
and atomically renamed, so a crash leaves either the whole frame or nothing. The spool
refuses frames past its byte budget; the caller then reports those sequence numbers as
dropped (never silent loss).
"""
from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path

_SUFFIX = ".frame"


class Spool:
    def __init__(self, directory: str | os.PathLike, budget_bytes: int):
        if budget_bytes < 0:
            raise ValueError(f"spool budget must be >= 0 bytes, got {budget_bytes}")
        self.directory = Path(directory)
        self.budget_bytes = int(budget_bytes)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"spool directory {str(self.directory)!r} is not writable: {exc.strerror or exc}") from None
        self._lock = threading.Lock()
        self._sizes: dict[int, int] = {}
        for path in self.directory.glob(f"*{_SUFFIX}"):  # frames left by an earlier process
            try:
                self._sizes[int(path.stem)] = path.stat().st_size
            except (ValueError, OSError):
                continue
        for tmp in self.directory.glob("*.tmp"):
            tmp.unlink(missing_ok=True)

    @property
    def bytes_used(self) -> int:
        with self._lock:
            return sum(self._sizes.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._sizes)

    def _path(self, seq: int) -> Path:
        return self.directory / f"{seq:012d}{_SUFFIX}"

    def put(self, seq: int, data: bytes) -> bool:
        """Persist one frame; False (nothing written) when it would exceed the budget."""
        with self._lock:
            if seq in self._sizes:
                return True
            if sum(self._sizes.values()) + len(data) > self.budget_bytes:
                return False
            self._sizes[seq] = len(data)  # reserve before the slow write
        path = self._path(seq)
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            with self._lock:
                self._sizes.pop(seq, None)
            return False
        return True

    def get(self, seq: int) -> bytes:
        return self._path(seq).read_bytes()

    def remove(self, seq: int) -> None:
        with self._lock:
            self._sizes.pop(seq, None)
        self._path(seq).unlink(missing_ok=True)

    def seqs(self) -> list[int]:
        with self._lock:
            return sorted(self._sizes)
