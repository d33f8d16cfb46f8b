"""Frame codec: the unit the probe ships and the collector stores.

Wire format: MAGIC, a u32 header length, the header as JSON, then one Arrow IPC stream
(LZ4-compressed buffers) per table, at the offsets the header lists. String columns that
hold one value per chunk travel as one-value dictionaries; decode() returns plain strings (a worker
may keep the dictionaries: the store writes them as they are). A frame carries
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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from moescope.schema import SCHEMA_VERSION, STORED, SchemaError, check_frame_id, check_run_id, conform
from moescope.token_texts import check_entries as check_token_texts

MAGIC = b"MOEF"
_LEN = struct.Struct("<I")
_MAX_HEADER = 16 << 20
# Bounds on what one message may make a worker do (a frame on the stream is untrusted input).
MAX_SEQ = 2**31 - 1                 # the ledger stores seq as a 32-bit integer
MAX_DROPPED_SEQS = 65_536           # drop reports one frame may carry; the sink spreads the rest
MAX_PRODUCER_LEN = 200
MAX_TABLE_ROWS = 16 << 20           # rows per table, declared in the header, checked before decoding
MAX_DECODED_BYTES = 1 << 30         # decoded Arrow bytes per frame, checked batch by batch
# LZ4: against zstd it halves the probe's encode and the worker's decode for ~40% more
# bytes on the wire (benchmarks/bench_ingest.py); readers accept either codec.
_WRITE_OPTIONS = pa.ipc.IpcWriteOptions(compression="lz4")
_WIRE_DICT = pa.dictionary(pa.int8(), pa.string())


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
        table = _wire_table(table)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema, options=_WRITE_OPTIONS) as writer:
            writer.write_table(table)
        blobs.append(sink.getvalue())  # Arrow buffers: the join below is the only copy
        index.append({"name": name, "length": blobs[-1].size, "rows": table.num_rows})
    header = json.dumps({**frame.header(), "tables": index}, separators=(",", ":")).encode()
    return b"".join([MAGIC, _LEN.pack(len(header)), header, *blobs])


def _wire_table(table: pa.Table) -> pa.Table:
    """`table` with each string column that holds one value per chunk (run, checkpoint, phase, ...) as a
    one-value dictionary. A plain string column's offsets do not compress (LZ4 finds no repeats in an
    arithmetic series): they were ~60% of a frame's bytes, and bytes are what Redis and the worker's
    socket read pay for. decode() turns them back into plain strings."""
    fields, columns = [], []
    for field, column in zip(table.schema, table.columns):
        if pa.types.is_string(column.type):
            chunks = [_one_value(chunk) for chunk in column.chunks]
            if chunks and all(c is not None for c in chunks):
                column = pa.chunked_array(chunks, _WIRE_DICT)
                field = field.with_type(_WIRE_DICT)
        fields.append(field)
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=pa.schema(fields, metadata=table.schema.metadata))


def _one_value(arr: pa.StringArray) -> pa.DictionaryArray | None:
    """`arr` as a dictionary of at most one value, or None when it holds more than one distinct string."""
    n = len(arr)
    if arr.null_count == n:
        return pa.DictionaryArray.from_arrays(pa.nulls(n, pa.int8()), pa.array([], pa.string()))
    if arr.null_count:
        return None
    offsets = np.frombuffer(arr.buffers()[1], np.int32, n + 1, arr.offset * 4)
    start, width = int(offsets[0]), int(offsets[1] - offsets[0])
    if int(offsets[-1]) - start != width * n or not np.all(np.diff(offsets) == width):
        return None
    data = arr.buffers()[2]
    value = data.slice(start, width).to_pybytes() if width else b""
    if width and not data.slice(start, width * n).equals(pa.py_buffer(value * n)):
        return None
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int8)), pa.array([value.decode()], pa.string()))


def decode(data: bytes, *, validate: bool = True, max_rows: int = MAX_TABLE_ROWS,
           max_decoded_bytes: int = MAX_DECODED_BYTES, keep_dictionaries: bool = False) -> Frame:
    """Parse and (by default) validate a frame against schema v1; FrameError on anything wrong.

    A frame may declare at most `max_rows` rows per table and decode to at most
    `max_decoded_bytes` of Arrow data, so a small message cannot make a worker allocate
    without bound. keep_dictionaries: a string column holding one value stays the one-value
    dictionary it travelled as (the store writes it as it is, and Parquet stores both
    alike); by default every string column comes back plain.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise FrameError(f"frame must be bytes, got {type(data).__name__}")
    data = bytes(data)
    header, offset = read_header(data)
    whole = pa.py_buffer(data)  # tables are read from zero-copy slices of it
    _check_header(header)
    tables, decoded = {}, 0
    seen: set[str] = set()
    for entry in header["tables"]:
        if not isinstance(entry, dict):
            raise FrameError(f"bad table entry {str(entry)[:80]!r} in frame {header['frame_id']}")
        name, length, rows = entry.get("name"), entry.get("length"), entry.get("rows")
        if (name not in STORED or name in seen or not _is_int(length) or length < 0 or offset + length > len(data)
                or not _is_int(rows) or rows < 0):
            raise FrameError(f"bad table entry {str(entry)[:200]} in frame {header['frame_id']}")
        if rows > max_rows:
            raise FrameError(f"table {name!r} declares {rows} rows, more than the {max_rows} a frame may carry")
        seen.add(name)
        try:
            reader, batches = pa.ipc.open_stream(whole.slice(offset, length)), []
            for batch in reader:
                batch.validate()  # buffer sizes (a dictionary's too) before anything reads them, nbytes included
                decoded += batch.nbytes
                if decoded > max_decoded_bytes:
                    raise FrameError(f"frame {header['frame_id']} decodes to more than {max_decoded_bytes} bytes")
                batches.append(batch)
            table = pa.Table.from_batches(batches, schema=reader.schema)
            _validate(name, table)
            table, decoded, one_value = _plain_strings(name, table, decoded, max_decoded_bytes, keep_dictionaries)
        except FrameError:
            raise
        except (pa.ArrowException, OSError, ValueError, MemoryError, IndexError) as exc:
            # Corrupt bytes surface as many Arrow errors (invalid, not implemented, huge malloc).
            raise FrameError(f"table {name!r} is not readable Arrow IPC: {str(exc)[:200]}") from None
        if table.num_rows != rows:
            raise FrameError(f"table {name!r} has {table.num_rows} rows, header says {entry.get('rows')}")
        if validate:
            try:
                table = conform(name, table)
            except (SchemaError, pa.ArrowException, ValueError) as exc:
                raise FrameError(str(exc)[:300]) from None
            if one_value.get("run") != header["run"]:  # else every row already names it
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


def _validate(name: str, table: pa.Table) -> None:
    """Arrow's full validation (offsets, UTF-8, dictionary indices) of every column that has anything beyond
    fixed-width values to check; numbers and booleans need only the cheap structural pass."""
    table.validate()
    if len(set(table.column_names)) != table.num_columns:
        raise FrameError(f"table {name!r} names a column twice: {table.column_names}"[:300])
    for column in table.columns:
        t = column.type
        if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
            column.validate(full=True)


def _plain_strings(name: str, table: pa.Table, decoded: int, max_decoded_bytes: int,
                   keep_one_value: bool = False) -> tuple[pa.Table, int, dict]:
    """Dictionary-encoded string columns (how encode() ships one-value columns) as plain strings, counting
    what they expand to against the frame's byte bound first: a few bytes of indices must not become gigabytes.
    keep_one_value: a one-chunk column of one value stays a dictionary. Also returns {column: value} for the
    columns whose every row holds that one value."""
    one_value: dict[str, str] = {}
    for i, field in enumerate(table.schema):
        if not pa.types.is_dictionary(field.type):
            continue
        if not pa.types.is_string(field.type.value_type):
            raise FrameError(f"table {name!r} column {field.name!r} is a dictionary of {field.type.value_type}; "
                             "only string columns may be dictionary-encoded")
        chunks, values = [], set()
        for chunk in table.column(i).chunks:
            value, size = None, 0
            if len(chunk.dictionary) == 1 and chunk.null_count == 0:  # one value: what encode() sends
                value = chunk.dictionary[0].as_py()
                size = len(value.encode()) * len(chunk)
            elif chunk.null_count < len(chunk):
                size = pc.sum(pc.take(pc.binary_length(chunk.dictionary), chunk.indices)).as_py() or 0
            decoded += 4 * (len(chunk) + 1) + size
            if decoded > max_decoded_bytes:
                raise FrameError(f"table {name!r} decodes to more than {max_decoded_bytes} bytes")
            if value is not None:
                chunks.append(_repeated(value, len(chunk)))
            elif chunk.null_count == len(chunk):  # no value at all (probe_set outside probe sets)
                chunks.append(pa.nulls(len(chunk), pa.string()))
            else:
                chunks.append(chunk.cast(pa.string()))
            values.add(value)
        one = len(values) == 1 and None not in values
        if one:
            one_value[field.name] = next(iter(values))
        if keep_one_value and one and table.column(i).num_chunks == 1:
            continue
        table = table.set_column(i, field.with_type(pa.string()), pa.chunked_array(chunks, pa.string()))
    return table, decoded, one_value


def _repeated(value: str, n: int) -> pa.StringArray:
    column = repeated_strings(value, n)
    if column is None:
        raise FrameError(f"a string column of {n} rows of {len(value.encode())} bytes is more than one Arrow array holds")
    return column


def repeated_strings(value: str, n: int) -> pa.StringArray | None:
    """`value` on each of n rows, built from its buffers (a lookup of n indices into a one-value
    dictionary, or a dictionary cast, costs 10–40x more); None past 32-bit string offsets."""
    data = value.encode()
    if len(data) * n >= 2**31:
        return None
    offsets = np.arange(n + 1, dtype=np.int32) * np.int32(len(data))
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data * n))


def read_header(data: bytes) -> tuple[dict, int]:
    """The frame's JSON header (unchecked) and the offset of its first table; FrameError when absent."""
    if len(data) < len(MAGIC) + _LEN.size or not data.startswith(MAGIC):
        raise FrameError("not a moescope frame (bad magic)")
    (hlen,) = _LEN.unpack_from(data, len(MAGIC))
    start = len(MAGIC) + _LEN.size
    if hlen > _MAX_HEADER or start + hlen > len(data):
        raise FrameError(f"truncated frame: header length {hlen} exceeds {len(data) - start} bytes")
    try:
        header = json.loads(data[start : start + hlen])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FrameError(f"frame header is not JSON: {str(exc)[:200]}") from None
    if not isinstance(header, dict):
        raise FrameError("frame header is not an object")
    return header, start + hlen


def _check_header(header: Any) -> None:
    if not isinstance(header, dict):
        raise FrameError("frame header is not an object")
    if header.get("schema_version") != SCHEMA_VERSION:
        raise FrameError(f"unsupported schema_version {header.get('schema_version')!r}; this store reads v{SCHEMA_VERSION}")
    for key, kind in (("run", str), ("producer", str), ("frame_id", str), ("seq", int), ("tables", list), ("dropped_seqs", list)):
        if not isinstance(header.get(key), kind) or isinstance(header.get(key), bool):
            raise FrameError(f"frame header field {key!r} missing or not {kind.__name__}")
    seq = header["seq"]
    if not 0 <= seq <= MAX_SEQ:
        raise FrameError(f"frame header seq {seq} is outside 0..{MAX_SEQ}")
    dropped = header["dropped_seqs"]
    if len(dropped) > MAX_DROPPED_SEQS:
        raise FrameError(f"frame header carries {len(dropped)} dropped seqs; at most {MAX_DROPPED_SEQS} per frame")
    if not all(_is_int(s) and 0 <= s < seq for s in dropped):
        raise FrameError("frame header dropped_seqs must be earlier sequence numbers of the same producer")
    try:  # these two name files and directories: refuse anything a path could be built from
        check_frame_id(header["frame_id"])
        check_run_id(header["run"])
    except SchemaError as exc:
        raise FrameError(str(exc)) from None
    producer = header["producer"]
    if not producer or len(producer) > MAX_PRODUCER_LEN or not producer.isprintable():
        raise FrameError(f"frame header producer {producer[:80]!r} must be 1..{MAX_PRODUCER_LEN} printable characters")
    _check_meta(header.get("meta", {}))


# Registrations a frame may carry: field -> (types allowed, required). Checked here so a
# hostile header is a dead letter with its reason, never an error deep in the store.
_LAYER_TYPES = {"layer": ((int,), True), "module_path": ((str,), True), "num_experts": ((int,), True),
                "top_k": ((int,), True), "router_kind": ((str,), True), "capacity_factor": ((int, float, type(None)), False)}
_CHECKPOINT_TYPES = {"checkpoint": ((str,), True), "step": ((int, type(None)), False), "path": ((str, type(None)), False)}


def _check_meta(meta: Any) -> None:
    if not isinstance(meta, dict):
        raise FrameError("frame header field 'meta' is not an object")
    for key, types in (("layers", _LAYER_TYPES), ("checkpoints", _CHECKPOINT_TYPES)):
        entries = meta.get(key, [])
        if not isinstance(entries, list) or len(entries) > 100_000:
            raise FrameError(f"frame meta {key!r} must be a list")
        for entry in entries:
            bad = not isinstance(entry, dict) or any(
                (name not in entry and required) or (name in entry and (not isinstance(entry[name], allowed)
                                                                        or isinstance(entry[name], bool)))
                for name, (allowed, required) in types.items())
            if bad:
                raise FrameError(f"frame meta {key!r} entry {str(entry)[:200]} does not match "
                                 f"{ {n: [t.__name__ for t in a] for n, (a, _) in types.items()} }")
            if key == "layers" and not (0 <= entry["layer"] < 2**15 and 0 < entry["num_experts"] < 2**15
                                        and 0 < entry["top_k"] <= entry["num_experts"]):
                raise FrameError(f"frame meta layer entry {str(entry)[:200]} has out-of-range sizes")
            if key == "checkpoints" and not 0 < len(entry["checkpoint"]) <= 200:
                raise FrameError("frame meta checkpoint names must be 1..200 characters")
    if not isinstance(meta.get("run_config", {}) or {}, dict):
        raise FrameError("frame meta 'run_config' must be an object")
    try:
        check_token_texts(meta.get("token_texts", []))
    except ValueError as exc:
        raise FrameError(str(exc)) from None
    if not isinstance(meta.get("rollups", False), bool):
        raise FrameError("frame meta 'rollups' must be true or false")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_rows(name: str, table: pa.Table, run: str) -> None:
    if table.num_rows and not pc.all(pc.equal(table.column("run"), run)).as_py():
        raise FrameError(f"table {name!r} has rows for a run other than {run!r}")
