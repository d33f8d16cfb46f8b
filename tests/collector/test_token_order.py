"""Routing segments record in their footer whether their rows were written in token order."""
import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from moescope.collector import token_order
from moescope.kernels import MoEConfig, ModelConfig, MoETransformer
from moescope.probe import MemorySink, attach

from .test_row_groups import frame, routing


def recorded(path: str) -> bool:
    meta = pq.read_metadata(path).metadata or {}
    return meta.get(token_order.KEY.encode()) == token_order.VALUE.encode()


def flags(store, run="r") -> list[bool]:
    return [recorded(p) for p in store.segment_paths("routing", run)]


def test_the_probes_segments_record_token_order(store):
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=3, num_heads=2, ffn_size=48, max_seq_len=32,
                      moe=MoEConfig(num_experts=6, top_k=2, score="softmax", capacity_factor=1.0))
    model = MoETransformer.from_config(cfg, seed=0)
    sink = MemorySink()
    with attach(model, sink=sink, run="probed") as probe, torch.no_grad():
        for step in range(3):
            probe.set_step(step)
            for _ in range(2):  # two microbatches a step
                model(torch.randint(0, 64, (4, 16)))
    for f in sink.frames:
        store.write_frame(f)
    got = flags(store, "probed")
    assert got and all(got)
    assert not any(recorded(p) for p in store.segment_paths("expert_step", "probed"))  # no per-token order there


def test_rows_out_of_token_order_or_mixing_ranks_or_checkpoints_record_nothing():
    table = routing(steps=2, tokens=50)
    for name, bad in {
        "shuffled": table.take(np.random.default_rng(0).permutation(table.num_rows)),
        "two ranks": table.set_column(3, "rank", pa.array(np.arange(table.num_rows, dtype=np.int32) % 2)),
        "two checkpoints": table.set_column(1, "checkpoint", pa.array(["a", "b"] * (table.num_rows // 2))),
        "a step goes back": pa.concat_tables([routing(steps=1, tokens=50, step0=5), routing(steps=1, tokens=50, step0=4)]),
    }.items():
        order = token_order.TokenOrder(bad.schema)
        order.feed(bad)
        assert order.metadata() == {}, name
    order = token_order.TokenOrder(table.schema)
    order.feed(table)
    assert order.metadata() == {token_order.KEY: token_order.VALUE}


def test_layers_interleaved_within_a_frame_keep_their_own_order():
    token_major = routing(steps=3, tokens=40, token_major=True)  # layer changes every row; each layer's rows ascend
    order = token_order.TokenOrder(token_major.schema)
    order.feed(token_major)
    assert order.metadata()
    # Across row groups too: a later group may not start a layer behind where an earlier one left it.
    order = token_order.TokenOrder(token_major.schema)
    order.feed(routing(steps=1, tokens=40, step0=3))
    order.feed(routing(steps=1, tokens=40, step0=2))
    assert order.metadata() == {}


def test_compaction_records_the_order_only_when_the_merge_keeps_it(store):
    # Segments are merged in the order they were written: steps ascending keeps every layer in order, descending not.
    for run, seqs in (("r", range(4)), ("back", range(3, -1, -1))):
        for seq in seqs:
            f = frame(seq, steps=1, tokens=500)
            rows = f.tables["routing"]
            store.write_frame(dataclasses.replace(f, run=run, producer=run, tables={
                "routing": rows.set_column(0, "run", pa.array([run] * rows.num_rows))}))
        assert all(flags(store, run))
    store.compact(min_files=2, target_rows=10_000_000)
    (merged,) = store.segment_paths("routing", "r")
    (merged_back,) = store.segment_paths("routing", "back")
    assert recorded(merged) and not recorded(merged_back)
