"""Frame codec: the unit the probe ships and the collector stores.

Wire format: MAGIC, a u32 header length, the header as JSON, then one Arrow IPC stream
(zstd-compressed buffers) per table, at the offsets the header lists. A frame carries
schema version, run, producer id, a per-producer monotonically increasing sequence
number and a uuid; (producer, seq) lets the store prove nothing was lost or duplicated.
"""
from __future__ import annotations

import json
import struct
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from moescope.schema import SCHEMA_VERSION, TABLES, SchemaError, conform

MAGIC = b"MOEF"
_LEN = struct.Struct("<I")
_MAX_HEADER = 16 << 20
_WRITE_OPTIONS = pa.ipc.IpcWriteOptions(compression="zstd")


class FrameError(ValueError):
    """Bytes that are not a valid frame; the message says what is wrong."""


@dataclass
class Frame:
    run: str
    producer: str
    seq: int
    tables: dict[str, pa.Table] = field(default_factory=dict)
    frame_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    schema_version: int = SCHEMA_VERSION
    # Sequence numbers this producer gave up on (spill budget exceeded) since its last frame.
    dropped_seqs: list[int] = field(default_factory=list)
    # Registrations that ride along: {"layers": [...], "checkpoints": [...], "run_config": {...}}.
    meta: dict[str, Any] = field(default_factory=dict)
    # True on the producer's last frame: its seq + 1 is the number of frames it sent.
    final: bool = False
    created_at: float = field(default_factory=time.time)

    @property
    def rows(self) -> int:
        return sum(t.num_rows for t in self.tables.values())

    def header(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "run": self.run,
            "producer": self.producer,
            "seq": self.seq,
            "frame_id": self.frame_id,
            "dropped_seqs": list(self.dropped_seqs),
            "meta": self.meta,
            "final": self.final,
            "created_at": self.created_at,
        }


def encode(frame: Frame) -> bytes:
    blobs, index = [], []
    for name, table in frame.tables.items():
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema, options=_WRITE_OPTIONS) as writer:
            writer.write_table(table)
        blobs.append(sink.getvalue().to_pybytes())
        index.append({"name": name, "length": len(blobs[-1]), "rows": table.num_rows})
    header = json.dumps({**frame.header(), "tables": index}, separators=(",", ":")).encode()
    return b"".join([MAGIC, _LEN.pack(len(header)), header, *blobs])


def decode(data: bytes, *, validate: bool = True) -> Frame:
    """Parse and (by default) validate a frame against schema v1; FrameError on anything wrong."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise FrameError(f"frame must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < len(MAGIC) + _LEN.size or not data.startswith(MAGIC):
        raise FrameError("not a moescope frame (bad magic)")
    (hlen,) = _LEN.unpack_from(data, len(MAGIC))
    start = len(MAGIC) + _LEN.size
    if hlen > _MAX_HEADER or start + hlen > len(data):
        raise FrameError(f"truncated frame: header length {hlen} exceeds {len(data) - start} bytes")
    try:
        header = json.loads(data[start : start + hlen])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrameError(f"frame header is not JSON: {exc}") from None
    _check_header(header)
    offset, tables = start + hlen, {}
    for entry in header["tables"]:
        name, length = entry.get("name"), entry.get("length")
        if name not in TABLES or not isinstance(length, int) or length < 0 or offset + length > len(data):
            raise FrameError(f"bad table entry {entry!r} in frame {header['frame_id']}")
        try:
            table = pa.ipc.open_stream(pa.py_buffer(data[offset : offset + length])).read_all()
            table.validate(full=True)
        except (pa.ArrowException, OSError, ValueError, MemoryError) as exc:
            # Corrupt bytes surface as many Arrow errors (invalid, not implemented, huge malloc).
            raise FrameError(f"table {name!r} is not readable Arrow IPC: {str(exc)[:200]}") from None
        if table.num_rows != entry.get("rows"):
            raise FrameError(f"table {name!r} has {table.num_rows} rows, header says {entry.get('rows')}")
        if validate:
            try:
                table = conform(name, table)
            except (SchemaError, pa.ArrowException, ValueError) as exc:
                raise FrameError(str(exc)[:300]) from None
            _check_rows(name, table, header["run"])
        tables[name] = table
        offset += length
    if offset != len(data):
        raise FrameError(f"{len(data) - offset} trailing bytes after the last table")
    return Frame(
        run=header["run"], producer=header["producer"], seq=header["seq"], tables=tables,
        frame_id=header["frame_id"], schema_version=header["schema_version"],
        dropped_seqs=list(header["dropped_seqs"]), meta=header.get("meta") or {},
        final=bool(header.get("final")), created_at=float(header.get("created_at", 0.0)),
    )


def _check_header(header: Any) -> None:
    if not isinstance(header, dict):
        raise FrameError("frame header is not an object")
    if header.get("schema_version") != SCHEMA_VERSION:
        raise FrameError(f"unsupported schema_version {header.get('schema_version')!r}; this store reads v{SCHEMA_VERSION}")
    for key, kind in (("run", str), ("producer", str), ("frame_id", str), ("seq", int), ("tables", list), ("dropped_seqs", list)):
        if not isinstance(header.get(key), kind) or isinstance(header.get(key), bool):
            raise FrameError(f"frame header field {key!r} missing or not {kind.__name__}")
    if header["seq"] < 0 or not all(isinstance(s, int) and s >= 0 for s in header["dropped_seqs"]):
        raise FrameError("frame header has a negative sequence number")
    if not header["run"] or not header["producer"]:
        raise FrameError("frame header has an empty run or producer")
    if not isinstance(header.get("meta", {}), dict):
        raise FrameError("frame header field 'meta' is not an object")


def _check_rows(name: str, table: pa.Table, run: str) -> None:
    if table.num_rows and not pc.all(pc.equal(table.column("run"), run)).as_py():
        raise FrameError(f"table {name!r} has rows for a run other than {run!r}")
