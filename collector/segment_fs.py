"""Where the store's files live: a local directory, or object storage under any fsspec URL.

`open_files(location)` returns one of two classes with the same methods, all taking
paths relative to the store's root ("segments/routing/run=r/x.parquet"):

- `LocalFiles`: a directory. Each file is written under a temporary name, fsynced and
  renamed, so it appears whole or not at all.
- `ObjectFiles`: s3://bucket/prefix (or gs://, az://, memory://...). An object appears
  whole when its PUT (single or multipart) completes and never before, so files are
  written straight under their final key. Credentials and the endpoint come from the
  usual environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...).
  DuckDB reads the objects through the same fsspec filesystem (`attach(con)`).

Both refuse a relative path that leaves the root: metadata never makes the store write,
move or delete anything outside it.
"""
from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from moescope.collector.row_groups import by_layer
from moescope.collector.token_order import TokenOrder
from moescope.schema import is_string_dictionary

# Fresh per-frame segments are written fast (ingest is bound by this write); compaction
# rewrites them at a higher level once they are cold.
INGEST_PARQUET_KW = {"compression": "zstd", "compression_level": 1}
COMPACT_PARQUET_KW = {"compression": "zstd", "compression_level": 3}
# Compacted files are written in row groups of about this many rows (small frames merged).
ROW_GROUP_ROWS = 256_000


class StoreError(ValueError):
    """A store that cannot be used as asked; the message says why."""


def is_url(location: str | os.PathLike) -> bool:
    """True for an object-storage URL (scheme://...); file:// and plain paths are directories."""
    text = os.fspath(location)
    return "://" in text and not text.startswith("file://")


def open_files(location: str | os.PathLike) -> "LocalFiles | ObjectFiles":
    if is_url(location):
        return ObjectFiles(os.fspath(location))
    text = os.fspath(location)
    return LocalFiles(Path(text[len("file://"):] if text.startswith("file://") else text))


class LocalFiles:
    remote = False

    def __init__(self, root: Path):
        self.root = root.expanduser().absolute()
        self.location = str(self.root)

    def prepare(self, create: bool) -> None:
        """Create the directory and prove it writable (create), or require that it exists."""
        if not create:
            if not self.root.is_dir():
                raise StoreError(f"no store at {self.location!r}")
            return
        try:
            (self.root / "segments").mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-test-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StoreError(f"store directory {self.location!r} is not writable: {exc.strerror or exc}") from None

    def path(self, rel: str) -> Path:
        """The absolute path of `rel`, refusing anything that resolves outside the store root."""
        path = (self.root / rel).resolve()
        root = self.root.resolve()
        if path != root and root not in path.parents:
            raise StoreError(f"path {rel!r} resolves outside the store {str(root)!r}")
        return path

    def url(self, rel: str) -> str:
        """What DuckDB's read_parquet is given for `rel` (and what its error messages quote)."""
        return str(self.root / rel)

    def attach(self, con) -> None:
        return None  # DuckDB reads local files itself

    def write_parquet(self, table: pa.Table, rel: str, options: dict = INGEST_PARQUET_KW) -> None:
        with _atomic_file(self.path(rel)) as fh:
            _write_table(table, fh, options)

    def write_parquets(self, items: list[tuple[pa.Table, str]]) -> None:
        """A frame's tables, each as write_parquet, but every file written before the first is fsynced:
        one journal commit then carries all of them instead of one commit per file."""
        with contextlib.ExitStack() as files:
            for table, rel in items:
                _write_table(table, files.enter_context(_atomic_file(self.path(rel))), INGEST_PARQUET_KW)

    def write_parquet_parts(self, parts: Iterable[pa.Table], schema: pa.Schema, rel: str, options: dict) -> int:
        with _atomic_file(self.path(rel)) as fh:
            return _write_parts(parts, schema, fh, options)

    def read_table(self, rel: str) -> pa.Table:
        return pq.read_table(self.path(rel))

    def read_metadata(self, rel: str) -> pq.FileMetaData:
        return pq.read_metadata(self.path(rel))

    def remove(self, rel: str) -> None:
        self.path(rel).unlink(missing_ok=True)

    def remove_tree(self, rel: str) -> None:
        folder = self.path(rel)
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)

    def move(self, src: str, dst: str) -> None:
        source, target = self.path(src), self.path(dst)
        if source.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)


class ObjectFiles:
    remote = True

    def __init__(self, url: str):
        import fsspec

        self.scheme = url.split("://", 1)[0]
        try:
            # No listings cache: other processes add and remove objects all the time, and a
            # stale listing would hide a new segment from a long-lived server.
            self.fs, root = fsspec.core.url_to_fs(url, use_listings_cache=False)
        except (ImportError, ValueError, TypeError) as exc:  # unknown scheme, or its package (s3fs...) not installed
            raise StoreError(f"cannot open store {url!r}: {_one_line(exc)}") from None
        self.root = root.rstrip("/")
        if not self.root.strip("/"):
            raise StoreError(f"store URL {url!r} names no bucket (e.g. s3://bucket/prefix)")
        self.location = self.url(".")

    def prepare(self, create: bool) -> None:
        """Prove the prefix writable (create) or its bucket reachable; buckets are never created here."""
        bucket = self.root.lstrip("/").split("/", 1)[0]
        try:
            if create:
                probe = self.key(f".write-test-{uuid.uuid4().hex}")
                self.fs.pipe_file(probe, b"")
                self.fs.rm_file(probe)
            elif not self.fs.exists(bucket):
                raise FileNotFoundError(f"bucket {bucket!r} does not exist")
        except Exception as exc:  # noqa: BLE001 - botocore and friends raise many kinds; one line for the user
            what = "is not writable" if create else "cannot be read"
            raise StoreError(f"store {self.location!r} {what}: {_one_line(exc)}") from None

    def key(self, rel: str) -> str:
        """The filesystem path (bucket/prefix/rel) of `rel`, refusing anything that leaves the prefix."""
        norm = posixpath.normpath(rel)
        if rel.startswith("/") or norm == ".." or norm.startswith("../"):
            raise StoreError(f"path {rel!r} resolves outside the store {self.location!r}")
        return self.root if norm == "." else f"{self.root}/{norm}"

    path = key

    def url(self, rel: str) -> str:
        return f"{self.scheme}://{self.key(rel).lstrip('/')}"

    def attach(self, con) -> None:
        """Let DuckDB read this store's URLs through our fsspec filesystem (once per database: cursors share it)."""
        import duckdb

        with contextlib.suppress(duckdb.InvalidInputException):  # registered already
            con.register_filesystem(_reader(self.fs))

    def write_parquet(self, table: pa.Table, rel: str, options: dict = INGEST_PARQUET_KW) -> None:
        self.fs.pipe_file(self.key(rel), _parquet_bytes(table, options))  # one PUT: the object appears whole

    def write_parquets(self, items: list[tuple[pa.Table, str]]) -> None:
        """A frame's tables, each one PUT, sent concurrently."""
        self.fs.pipe({self.key(rel): _parquet_bytes(table, INGEST_PARQUET_KW) for table, rel in items})

    def write_parquet_parts(self, parts: Iterable[pa.Table], schema: pa.Schema, rel: str, options: dict) -> int:
        # Through a local temporary file, so a failure half-way never leaves a truncated object.
        with tempfile.NamedTemporaryFile(suffix=".parquet") as tmp:
            rows = _write_parts(parts, schema, tmp, options)
            tmp.flush()
            self.fs.put_file(tmp.name, self.key(rel))
        return rows

    def read_table(self, rel: str) -> pa.Table:
        with self.fs.open(self.key(rel), "rb") as fh:
            return pq.read_table(fh)

    def read_metadata(self, rel: str) -> pq.FileMetaData:
        with self.fs.open(self.key(rel), "rb") as fh:
            return pq.read_metadata(fh)

    def remove(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.key(rel))

    def remove_tree(self, rel: str) -> None:
        # A trailing slash: "run=ab" must not also take the objects of "run=abc".
        with contextlib.suppress(FileNotFoundError):
            keys = self.fs.find(self.key(rel).rstrip("/") + "/")
            if keys:
                self.fs.rm(keys)

    def move(self, src: str, dst: str) -> None:
        source, target = self.key(src), self.key(dst)
        with contextlib.suppress(FileNotFoundError):
            self.fs.copy(source, target)
            self.fs.rm_file(source)


# DuckDB's reads of objects: what one process keeps of objects' bytes, and the largest object kept.
READ_CACHE_BYTES = 256 << 20
READ_CACHE_MAX_OBJECT = 64 << 20
_READERS: dict[int, Any] = {}
_READERS_LOCK = threading.Lock()


def _reader(fs):
    """The one read-through cache over `fs` in this process (fsspec shares `fs` among stores too)."""
    with _READERS_LOCK:
        reader = _READERS.get(id(fs))
        if reader is None or reader.fs is not fs:
            reader = _READERS[id(fs)] = _make_reader(fs)
        return reader


def _make_reader(fs):
    from fsspec.implementations.memory import MemoryFile
    from fsspec.spec import AbstractFileSystem

    class ImmutableObjects(AbstractFileSystem):
        """`fs` as DuckDB reads segments: an object never changes under its name, so its details are
        asked for once and its bytes fetched in one GET and kept (LRU, READ_CACHE_BYTES).

        Without it DuckDB asks for each file's details about ten times per query (each a
        HEAD) and reads it in several ranged GETs.
        """

        cachable = False
        protocol = fs.protocol

        def __init__(self):
            super().__init__()
            self.fs = fs
            self._details: OrderedDict[str, dict] = OrderedDict()
            self._bytes: OrderedDict[str, bytes] = OrderedDict()
            self._held = 0
            self._lock = threading.Lock()

        def _strip_protocol(self, path):
            return fs._strip_protocol(path)

        def info(self, path, **kwargs):
            path = self._strip_protocol(path)
            with self._lock:
                found = self._details.get(path)
            if found is None:
                found = fs.info(path)
                with self._lock:
                    self._details[path] = found
                    if len(self._details) > 100_000:
                        self._details.popitem(last=False)
            return found

        def modified(self, path):
            found = self.info(path)
            stamp = found.get("LastModified") or found.get("mtime") or found.get("updated")
            return stamp if stamp is not None else fs.modified(self._strip_protocol(path))

        def exists(self, path, **kwargs):
            try:
                self.info(path)
                return True
            except FileNotFoundError:
                return False

        def glob(self, path, **kwargs):
            if any(c in path for c in "*?["):
                return fs.glob(path, **kwargs)
            return [self._strip_protocol(path)] if self.exists(path) else []

        def ls(self, path, detail=True, **kwargs):
            return fs.ls(path, detail=detail, **kwargs)

        def _open(self, path, mode="rb", **kwargs):
            if mode != "rb":
                return fs.open(path, mode)
            size = self.info(path)["size"]
            if size > READ_CACHE_MAX_OBJECT:
                return fs.open(path, "rb")
            with self._lock:
                data = self._bytes.get(path)
                if data is not None:
                    self._bytes.move_to_end(path)
            if data is None:
                data = fs.cat_file(path)
                with self._lock:
                    if path not in self._bytes:
                        self._bytes[path] = data
                        self._held += len(data)
                    while self._held > READ_CACHE_BYTES and len(self._bytes) > 1:
                        self._held -= len(self._bytes.popitem(last=False)[1])
            return MemoryFile(None, path, data)

    return ImmutableObjects()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def _atomic_file(path: Path):
    """An open file that appears at `path` whole (fsynced, renamed) or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_table(table: pa.Table, sink, options: dict) -> None:
    # Dictionary-encode only the string columns (run, checkpoint, domain, phase): on the
    # numeric columns it halves write speed and saves nothing after zstd.
    strings = [f.name for f in table.schema
               if pa.types.is_string(f.type) or pa.types.is_large_string(f.type) or is_string_dictionary(f.type)]
    # Columns that arrive as dictionaries are written as they are (no hashing of every row), without the
    # Arrow schema in the footer, so every reader gets plain strings back as from any other segment.
    kept = any(is_string_dictionary(f.type) for f in table.schema)
    groups = by_layer(table)
    order = TokenOrder(table.schema)
    with pq.ParquetWriter(sink, table.schema, use_dictionary=strings, store_schema=not kept, **options) as writer:
        for group in groups:
            order.feed(group)
            writer.write_table(group)
        writer.add_key_value_metadata(order.metadata())


def _parquet_bytes(table: pa.Table, options: dict) -> bytes:
    sink = pa.BufferOutputStream()
    _write_table(table, sink, options)
    return sink.getvalue().to_pybytes()


def _write_parts(parts: Iterable[pa.Table], schema: pa.Schema, sink, options: dict) -> int:
    """Stream tables into one Parquet file; returns rows written. Tables are gathered to about ROW_GROUP_ROWS
    rows, then written as row groups by layer (row_groups.by_layer): one input in memory at a time, or a few small ones."""
    strings = [f.name for f in schema if pa.types.is_string(f.type)]
    rows = 0
    order = TokenOrder(schema)
    with pq.ParquetWriter(sink, schema, use_dictionary=strings, **options) as writer:
        def flush(pending: list[pa.Table]) -> None:
            for group in by_layer(pa.concat_tables(pending)):
                order.feed(group)
                writer.write_table(group)

        pending: list[pa.Table] = []
        held = 0
        for part in parts:
            pending.append(part)
            rows += part.num_rows
            held += part.num_rows
            if held >= ROW_GROUP_ROWS:
                flush(pending)
                pending, held = [], 0
        if pending:
            flush(pending)
        writer.add_key_value_metadata(order.metadata())
    return rows
