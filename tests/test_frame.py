"""Frame codec: round trip, and every kind of bad bytes is a FrameError naming the problem."""
import json
import random

import pyarrow as pa
import pytest

from moescope.frame import MAGIC, Frame, FrameError, decode, encode
from moescope.schema import EXPERT_STEP, SchemaError, check_run_id, conform


def expert_step(run="r", n=4):
    return pa.Table.from_pydict({
        "run": [run] * n, "checkpoint": ["c"] * n, "step": [1] * n, "rank": [0] * n, "layer": [0] * n,
        "expert": list(range(n)), "num_tokens": [10] * n, "tokens": [5] * n, "dropped": [1] * n, "top1": [2] * n,
        "prob_sum": [2.5] * n, "weight_sum": [1.5] * n, "phase": ["train"] * n}, schema=EXPERT_STEP)


def test_round_trip_keeps_header_tables_and_metadata():
    f = Frame(run="r", producer="p", seq=7, tables={"expert_step": expert_step()}, dropped_seqs=[3, 4],
              meta={"checkpoints": [{"checkpoint": "c", "step": 1}]}, final=True)
    g = decode(encode(f))
    assert (g.run, g.producer, g.seq, g.frame_id, g.dropped_seqs, g.final) == ("r", "p", 7, f.frame_id, [3, 4], True)
    assert g.meta == f.meta and g.tables["expert_step"].equals(f.tables["expert_step"])


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b"XXXX" + b[4:], "bad magic"),
    (lambda b: b[:20], "truncated"),
    (lambda b: b + b"junk", "trailing bytes"),
])
def test_corrupt_bytes_are_frame_errors(mutate, message):
    data = encode(Frame(run="r", producer="p", seq=0, tables={"expert_step": expert_step()}))
    with pytest.raises(FrameError, match=message):
        decode(mutate(data))


def _with_header(data: bytes, **changes) -> bytes:
    hlen = int.from_bytes(data[4:8], "little")
    header = json.loads(data[8:8 + hlen])
    header.update(changes)
    new = json.dumps(header).encode()
    return MAGIC + len(new).to_bytes(4, "little") + new + data[8 + hlen:]


@pytest.mark.parametrize("changes, message", [
    ({"schema_version": 99}, "unsupported schema_version"),
    ({"seq": -1}, "seq -1 is outside"),
    ({"seq": 2**40}, "outside 0..2147483647"),
    ({"run": ""}, "invalid run id"),
    ({"run": "r\n"}, "invalid run id"),
    ({"run": "../r"}, "invalid run id"),
    ({"producer": 5}, "producer"),
    ({"producer": "p\r\nx"}, "printable"),
    ({"producer": "p" * 201}, "printable"),
    ({"run": "other"}, "run other than"),
    ({"frame_id": "../run=victim/0123"}, "invalid frame id"),
    ({"frame_id": "ABCDEF0123456789ABCDEF0123456789"}, "invalid frame id"),
    ({"frame_id": "0" * 31}, "invalid frame id"),
    ({"dropped_seqs": [0]}, "earlier sequence numbers"),
    ({"seq": 10, "dropped_seqs": list(range(5)) * 20_000}, "at most 65536"),
    ({"tables": [{"name": "expert_step", "length": 0, "rows": 2**30}]}, "declares 1073741824 rows"),
    ({"tables": ["x"]}, "bad table entry"),
])
def test_bad_headers_are_refused_with_the_reason(changes, message):
    data = encode(Frame(run="r", producer="p", seq=0, tables={"expert_step": expert_step()}))
    with pytest.raises(FrameError, match=message):
        decode(_with_header(data, **changes))


def test_random_bit_flips_never_escape_as_anything_but_frame_errors():
    data = bytearray(encode(Frame(run="r", producer="p", seq=0, tables={"expert_step": expert_step(n=64)})))
    rng = random.Random(1234)
    for _ in range(300):
        broken = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            broken[rng.randrange(len(broken))] ^= 1 << rng.randrange(8)
        try:
            decode(bytes(broken))
        except FrameError:
            pass


def test_conform_names_missing_columns_and_nulls():
    with pytest.raises(SchemaError, match="missing column"):
        conform("expert_step", expert_step().drop_columns(["tokens"]))
    nulls = expert_step().set_column(5, "expert", pa.array([None, 1, 2, 3], pa.int16()))
    with pytest.raises(SchemaError, match="nulls"):
        conform("expert_step", nulls)


def test_run_ids_are_kept_to_a_safe_alphabet():
    assert check_run_id("run-1.a:b+c_d") == "run-1.a:b+c_d"
    for bad in ("", "../x", "a/b", "a b", "-x"):
        with pytest.raises(SchemaError, match="invalid run id"):
            check_run_id(bad)


def test_a_frame_that_decodes_past_the_byte_bound_is_refused_before_it_is_whole():
    data = encode(Frame(run="r", producer="p", seq=0, tables={"expert_step": expert_step(n=4096)}))
    with pytest.raises(FrameError, match="decodes to more than 1000 bytes"):
        decode(data, max_decoded_bytes=1000)
    assert decode(data).tables["expert_step"].num_rows == 4096


@pytest.mark.parametrize("meta, message", [
    ({"layers": [{"layer": "x"}]}, "does not match"),
    ({"layers": [{"layer": 0, "module_path": "m", "num_experts": 8, "top_k": 9, "router_kind": "k"}]}, "out-of-range"),
    ({"checkpoints": [{"step": 3}]}, "does not match"),
    ({"checkpoints": [{"checkpoint": "c" * 201}]}, "1..200"),
    ({"layers": {}}, "must be a list"),
    ({"run_config": [1]}, "must be an object"),
])
def test_hostile_registrations_in_meta_are_refused_with_the_reason(meta, message):
    data = encode(Frame(run="r", producer="p", seq=0, tables={"expert_step": expert_step()}, meta=meta))
    with pytest.raises(FrameError, match=message):
        decode(data)


def test_one_value_string_columns_travel_as_dictionaries_and_come_back_as_the_strings_sent():
    first = expert_step(n=300)
    second = expert_step(n=200).set_column(1, "checkpoint", pa.array(["c2"] * 200)).cast(EXPERT_STEP)
    mixed = expert_step(n=100).set_column(12, "phase", pa.array(["train", None] * 50)).cast(EXPERT_STEP)
    table = pa.concat_tables([first, second, mixed])  # three chunks: one value, another value, two values and nulls
    frame = Frame(run="r", producer="p", seq=0, tables={"expert_step": table})
    data = encode(frame)
    assert decode(data).tables["expert_step"].equals(table)
    plain = pa.BufferOutputStream()  # what the same table costs with every string spelled out
    with pa.ipc.new_stream(plain, table.schema, options=pa.ipc.IpcWriteOptions(compression="lz4")) as writer:
        writer.write_table(table)
    assert len(data) < plain.getvalue().size


def _raw_frame(table: pa.Table) -> bytes:
    """A frame whose table is written as given (encode() sends non-string columns untouched)."""
    return encode(Frame(run="r", producer="p", seq=0, tables={"expert_step": table}))


def test_a_dictionary_that_expands_past_the_byte_bound_is_refused_before_it_is_expanded():
    n = 4000
    huge = pa.DictionaryArray.from_arrays(pa.array([0] * n, pa.int8()), pa.array(["x" * 1000]))
    table = expert_step(n=n).set_column(1, pa.field("checkpoint", huge.type), huge)
    data = _raw_frame(table)
    assert len(data) < 20_000  # 4 MB of strings in a few kilobytes
    with pytest.raises(FrameError, match="decodes to more than 1000000 bytes"):
        decode(data, max_decoded_bytes=1_000_000)
    assert decode(data).tables["expert_step"].column("checkpoint").type == pa.string()


def test_only_string_columns_may_arrive_dictionary_encoded():
    steps = pa.DictionaryArray.from_arrays(pa.array([0] * 4, pa.int8()), pa.array([1], pa.int64()))
    table = expert_step().set_column(2, pa.field("step", steps.type), steps)
    with pytest.raises(FrameError, match="'step' is a dictionary of int64; only string columns"):
        decode(_raw_frame(table))


def test_a_table_that_names_a_column_twice_is_a_frame_error():
    table = expert_step()
    twice = pa.Table.from_arrays(table.columns, names=[*table.column_names[:-1], "prob_sum"])
    with pytest.raises(FrameError, match="names a column twice"):
        decode(_raw_frame(twice))
