import os
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moescope.collector.row_groups import MAX_RUNS, MIN_GROUP_ROWS, by_layer
from moescope.frame import Frame
from moescope.schema import ROUTING

LAYERS = 4


def routing(steps: int, tokens: int, *, token_major: bool = False, seed: int = 0, step0: int = 0) -> pa.Table:
    """Routing rows as the probe sends them: per step, one run of rows per layer (or, token_major, layers interleaved)."""
    rng = np.random.default_rng(seed)
    n = steps * LAYERS * tokens
    step = np.repeat(np.arange(step0, step0 + steps), LAYERS * tokens)
    if token_major:
        layer = np.tile(np.arange(LAYERS, dtype=np.int16), steps * tokens)
        pos = np.tile(np.repeat(np.arange(tokens, dtype=np.int32), LAYERS), steps)
    else:
        layer = np.tile(np.repeat(np.arange(LAYERS, dtype=np.int16), tokens), steps)
        pos = np.tile(np.arange(tokens, dtype=np.int32), steps * LAYERS)
    return pa.table({"run": pa.array(["r"] * n), "checkpoint": pa.array(["c0"] * n), "step": step,
                     "rank": np.zeros(n, np.int32), "microbatch": np.zeros(n, np.int32), "seq": np.zeros(n, np.int32),
                     "pos": pos, "token_id": rng.integers(0, 1000, n, dtype=np.int32), "layer": layer,
                     "slot": np.zeros(n, np.int8), "expert": rng.integers(0, 8, n).astype(np.int16),
                     "weight": rng.random(n, dtype=np.float32), "dropped": np.zeros(n, bool),
                     "domain": pa.array(["code"] * n), "phase": pa.array(["train"] * n),
                     "probe_set": pa.nulls(n, pa.string())}, schema=ROUTING)


def stably_by_layer(table: pa.Table) -> pa.Table:
    return table.take(np.argsort(table.column("layer").to_numpy(), kind="stable"))


@pytest.mark.parametrize("token_major", [False, True], ids=["layer runs", "layers interleaved"])
def test_row_groups_hold_whole_layers_in_layer_order_and_keep_each_layers_row_order(token_major):
    table = routing(steps=8, tokens=5_000 if not token_major else 10_000, token_major=token_major)
    if token_major:
        assert table.num_rows > MAX_RUNS  # the sorted path
    groups = by_layer(table)
    assert pa.concat_tables(groups).equals(stably_by_layer(table))
    spans = [(int(pa.compute.min(g["layer"]).as_py()), int(pa.compute.max(g["layer"]).as_py())) for g in groups]
    assert all(hi < lo2 for (_, hi), (lo2, _) in zip(spans, spans[1:]))  # no layer is split across two groups
    assert all(g.num_rows >= MIN_GROUP_ROWS for g in groups[:-1])


def test_a_small_table_or_one_without_layers_stays_one_group():
    small = routing(steps=1, tokens=100)
    assert by_layer(small) == [small]
    no_layer = pa.table({"x": np.arange(3 * MIN_GROUP_ROWS)})
    assert by_layer(no_layer) == [no_layer]


def frame(seq: int, steps: int, tokens: int) -> Frame:
    return Frame(run="r", producer="p", seq=seq, frame_id=uuid.uuid4().hex,
                 tables={"routing": routing(steps, tokens, seed=seq, step0=seq * steps)},
                 meta={"layers": [{"layer": i, "module_path": f"layers.{i}.mlp", "num_experts": 8, "top_k": 1,
                                   "router_kind": "softmax-topk", "capacity_factor": None} for i in range(LAYERS)]})


def layer_spans(path: str) -> list[tuple[int, int]]:
    meta = pq.ParquetFile(path).metadata
    col = meta.schema.names.index("layer")
    return [(meta.row_group(i).column(col).statistics.min, meta.row_group(i).column(col).statistics.max)
            for i in range(meta.num_row_groups)]


def test_written_and_compacted_segments_let_a_one_layer_read_skip_the_other_layers(store):
    frames = [frame(seq, steps=8, tokens=10_000) for seq in range(3)]
    for f in frames:
        store.write_frame(f)
    for path in store.segment_paths("routing", "r"):
        assert layer_spans(path) == [(i, i) for i in range(LAYERS)]
    expected = pa.concat_tables([f.tables["routing"] for f in frames])
    expected = expected.filter(pa.compute.equal(expected["layer"], 2))

    def layer_two() -> pa.Table:
        got = store.arrow("SELECT step, pos, token_id, expert FROM routing WHERE layer = 2 ORDER BY step, pos", run="r")
        return got

    before = layer_two()
    assert before.column("token_id").to_pylist() == expected.column("token_id").to_pylist()
    assert store.compact(min_files=2) > 0
    (compacted,) = store.segment_paths("routing", "r")
    assert os.path.basename(compacted).startswith("c-")
    spans = layer_spans(compacted)
    assert all(lo == hi for lo, hi in spans) and sorted({lo for lo, _ in spans}) == list(range(LAYERS))
    assert layer_two().equals(before)


def test_compaction_of_many_small_frames_gathers_each_layers_rows(store):
    # 256 frames of 2,000 rows, each one row group holding every layer: merged, each row group holds one layer.
    for seq in range(256):
        store.write_frame(frame(seq, steps=1, tokens=500))
    counts = store.sql("SELECT layer, count(*) AS n, sum(token_id) AS s FROM routing GROUP BY layer ORDER BY layer", run="r")
    store.compact(min_files=2, target_rows=10_000_000)
    (compacted,) = store.segment_paths("routing", "r")
    spans = layer_spans(compacted)
    assert len(spans) > 1 and all(lo == hi for lo, hi in spans)
    assert store.sql("SELECT layer, count(*) AS n, sum(token_id) AS s FROM routing GROUP BY layer ORDER BY layer",
                     run="r").equals(counts)
