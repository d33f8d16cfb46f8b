"""Where the probe's frames go.

A sink has three methods: `send(frame)` (called from the probe's background thread;
it must not block for long), `flush(timeout=None)` and `close()`.

- "memory": keep the tables in this process (`probe.tables()`).
- "null": count and discard (benchmarks).
- "local" / "local:/path": write straight into a store directory (the embedded default).
- "redis://..." / "rediss://..." / "unix://...": stream to Redis (moescope.probe.redis_sink).
"""
from __future__ import annotations

import os
import threading
from typing import Protocol, runtime_checkable

import pyarrow as pa

from moescope.frame import Frame
from moescope.schema import TABLES


@runtime_checkable
class Sink(Protocol):
    def send(self, frame: Frame) -> None: ...

    def flush(self, timeout: float | None = None) -> None: ...

    def close(self) -> None: ...


class MemorySink:
    """Keeps every frame in memory; `tables()` concatenates them per table."""

    def __init__(self):
        self.frames: list[Frame] = []
        self._lock = threading.Lock()

    def send(self, frame: Frame) -> None:
        with self._lock:
            self.frames.append(frame)

    def flush(self, timeout: float | None = None) -> None:
        return None

    def close(self) -> None:
        return None

    def tables(self) -> dict[str, pa.Table]:
        with self._lock:
            frames = list(self.frames)
        out = {}
        for name, schema in TABLES.items():
            parts = [f.tables[name] for f in frames if name in f.tables and f.tables[name].num_rows]
            out[name] = pa.concat_tables(parts) if parts else schema.empty_table()
        return out


class NullSink:
    """Counts frames and rows, keeps nothing."""

    def __init__(self):
        self.frames = 0
        self.rows = 0

    def send(self, frame: Frame) -> None:
        self.frames += 1
        self.rows += frame.rows

    def flush(self, timeout: float | None = None) -> None:
        return None

    def close(self) -> None:
        return None


class LocalSink:
    """Writes frames straight into a store directory (no servers needed).

    The store is imported here, lazily, so a probe that streams to Redis never pulls
    DuckDB or SQLAlchemy into the training process.
    """

    def __init__(self, root: str | os.PathLike, database_url: str | None = None):
        from moescope.collector.store import Store

        self.store = Store(root, database_url)
        self.written = 0

    def send(self, frame: Frame) -> None:
        if self.store.write_frame(frame):
            self.written += 1

    def flush(self, timeout: float | None = None) -> None:
        return None  # every send is already durable

    def close(self) -> None:
        self.store.close()


_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def make_sink(spec: "str | Sink | None", **opts) -> Sink:
    """Build a sink from "memory", "null", "local", "local:/path", "redis://...", or pass a Sink through."""
    if spec is None:
        spec = "local"
    if not isinstance(spec, str):
        if all(callable(getattr(spec, m, None)) for m in ("send", "flush", "close")):
            return spec
        raise TypeError(f"sink must be a string or an object with send/flush/close, got {type(spec).__name__}")
    if spec == "memory":
        return MemorySink()
    if spec in ("null", "none"):
        return NullSink()
    if spec == "local" or spec.startswith("local:"):
        root = spec[len("local:"):] if spec.startswith("local:") else ""
        if not root:
            from moescope.settings import get_settings

            root = str(get_settings().store)
        return LocalSink(root, **opts)
    if spec.startswith(_REDIS_SCHEMES):
        from moescope.probe.redis_sink import RedisSink

        return RedisSink(spec, **opts)
    raise ValueError(f"unknown sink {spec!r}: use 'memory', 'local', 'local:/path/to/store', 'redis://host:6379/0' or a Sink object")
