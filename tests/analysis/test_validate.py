"""Capture validator: recorded stores pass; each planted corruption kind is caught by its check."""
from __future__ import annotations

import uuid

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from moescope.analysis.validate import validate_run
from moescope.frame import Frame
from moescope.schema import TABLES
from synth_runs import E, StepData, make_layer_tables, random_layer, uniform_layer

LAYERS = {0: (E, 2), 1: (E, 2)}


def failed(validation) -> set[str]:
    return {c.name for c in validation.checks if not c.ok}


def clean_tables(run: str) -> dict:
    """One step, two top-2 layers, weights renormalised over the two slots (as Mixtral records them)."""
    rng = np.random.default_rng(7)
    s = StepData(step=5, checkpoint="c0", token_ids_T=rng.integers(0, 50, 128))
    s.layers = [uniform_layer(0), random_layer(1, rng, capacity_factor=4.0)]
    parts = [make_layer_tables(run, s, ls) for ls in s.layers]
    frames = {name: pa.concat_tables([p[name] for p in parts]).to_pandas() for name in TABLES}
    routing = frames["routing"]
    routing["weight"] = routing.weight / routing.groupby(["layer", "seq", "pos"]).weight.transform("sum")
    return frames


def write(store, run: str, frames: dict) -> None:
    routing = frames["routing"]
    weight = pa.array(routing.pop("weight").to_numpy(np.float32), from_pandas=False)  # NaN stays NaN, not null
    frames["routing"] = routing.assign(weight=0.0)
    tables = {name: pa.Table.from_pandas(df, schema=TABLES[name], preserve_index=False) for name, df in frames.items()}
    tables["routing"] = tables["routing"].set_column(TABLES["routing"].get_field_index("weight"), "weight", weight)
    layers = [{"layer": layer, "module_path": f"layers.{layer}.mlp.gate", "num_experts": e, "top_k": k,
               "router_kind": "softmax-topk", "capacity_factor": None} for layer, (e, k) in LAYERS.items()]
    store.write_frame(Frame(run=run, producer=f"{run}-p", seq=0, tables=tables, frame_id=uuid.uuid4().hex,
                            meta={"layers": layers}))


def first_token(df, layer: int = 1):
    return (df.layer == layer) & (df.seq == 0) & (df.pos == 3)


def drop_a_slot(f):
    r = f["routing"]
    f["routing"] = r.drop(r.index[first_token(r) & (r.slot == 1)])


def out_of_range_id(f):
    r = f["routing"]
    r.loc[first_token(r) & (r.slot == 1), "expert"] = E


def duplicate_slot(f):
    r = f["routing"]
    f["routing"] = pd.concat([r, r[first_token(r) & (r.slot == 0)]])


def all_zero_rows(f):
    r = f["routing"]
    r.loc[first_token(r), ["expert", "weight"]] = [0, 0.0]


def nan_weight(f):
    r = f["routing"]
    r.loc[first_token(r) & (r.slot == 0), "weight"] = float("nan")


def weights_off_one(f):
    r = f["routing"]
    r.loc[first_token(r), "weight"] *= 0.5


def expert_step_miscount(f):
    es = f["expert_step"]
    es.loc[(es.layer == 1) & (es.expert == 0), "tokens"] += 1
    es.loc[(es.layer == 1) & (es.expert == 1), "tokens"] -= 1  # T·k still holds: only the per-expert count is off


def position_gap(f):
    for name in ("routing", "token_stats"):
        df = f[name]
        df.loc[(df.seq == 2) & (df.pos == 31), "pos"] = 40


def misaligned_token_ids(f):
    ts = f["token_stats"]
    sel = (ts.layer == 1) & (ts.seq == 1)
    ts.loc[sel, "token_id"] = np.roll(ts.loc[sel, "token_id"].to_numpy(), 1)  # layer 1's span shifted by one


def overwritten_layer(f):
    for name in ("routing", "token_stats"):  # layer 0 captured twice, layer 1 lost
        df = f[name]
        f[name] = pd.concat([df[df.layer == 0], df[df.layer == 0].assign(layer=1)])


CORRUPTIONS = [
    (drop_a_slot, {"assignments", "expert_step", "weights"}),
    (out_of_range_id, {"expert_ids", "expert_step"}),
    (duplicate_slot, {"duplicates", "assignments", "weights", "expert_step"}),
    (all_zero_rows, {"duplicates", "weights", "expert_step"}),
    (nan_weight, {"weights"}),
    (weights_off_one, {"weights"}),
    (expert_step_miscount, {"expert_step"}),
    (position_gap, {"positions"}),
    (misaligned_token_ids, {"token_ids"}),
    (overwritten_layer, {"expert_step"}),
]


def test_clean_capture_passes_every_check(store):
    write(store, "clean", clean_tables("clean"))
    v = validate_run(store, "clean")
    assert v.ok, v.text()
    weights = next(c for c in v.checks if c.name == "weights")
    assert any("layer 1: renormalises" in n for n in weights.notes)


@pytest.mark.parametrize("corrupt, expected", CORRUPTIONS, ids=[c.__name__ for c, _ in CORRUPTIONS])
def test_each_planted_corruption_is_caught_by_its_check(store, corrupt, expected):
    frames = clean_tables("bad")
    corrupt(frames)
    write(store, "bad", frames)
    v = validate_run(store, "bad")
    assert not v.ok
    assert failed(v) == expected, v.text()
    for check in v.checks:
        if not check.ok:
            assert check.examples, check.name  # every failure names where it is


def test_synth_runs_pass(synth):
    store, _ = synth
    v = validate_run(store, "synth")
    assert v.ok, v.text()


def test_reference_run_with_sampled_rows_passes_and_says_what_it_skipped(store):
    from moescope.kernels import MoEConfig, ModelConfig, MoETransformer
    from moescope.probe import attach

    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, ffn_size=64, max_seq_len=32,
                      moe=MoEConfig.switch(num_experts=4, capacity_factor=1.0))
    model = MoETransformer.from_config(cfg, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(8, 16, dtype=torch.long)
    mask[:3, 12:] = 0  # right padding
    with attach(model, sink=f"local:{store.root}", run="sampled", sample_rate=0.5) as probe, torch.no_grad():
        for step in range(3):
            probe.set_step(step)
            model(torch.randint(0, 64, (8, 16), generator=g), attention_mask=mask)
    v = validate_run(store, "sampled")
    assert v.ok, v.text()
    assert any("sampled per-token rows" in n for n in next(c for c in v.checks if c.name == "expert_step").notes)
    dropped = store.sql("SELECT count(*) AS n FROM routing WHERE dropped", run="sampled").n.iloc[0]
    assert dropped > 0  # capacity drops are in the data and are not mistaken for bad weights


def test_demo_store_passes(tmp_path):
    from moescope.analysis.store import AnalysisStore as Store
    from moescope.demo import run_demo

    store = Store(tmp_path / "demo")
    run_demo(store, steps=2, run="demo", checkpoints=1, batch_size=4, seq_len=32, progress=False)
    v = validate_run(store, "demo")
    assert v.ok, v.text()


def test_tiny_mixtral_with_left_padding_passes(store):
    transformers = pytest.importorskip("transformers")
    from moescope.probe import attach

    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(1, 64, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, :4] = 0
    with attach(model, sink=f"local:{store.root}", run="mixtral") as probe, torch.no_grad():
        probe.generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    v = validate_run(store, "mixtral")
    assert v.ok, v.text()


def test_bad_arguments_are_one_line_value_errors(synth):
    store, _ = synth
    with pytest.raises(ValueError, match="examples must be a non-negative int"):
        validate_run(store, "synth", examples=-1)
    with pytest.raises(ValueError, match="weight_tolerance"):
        validate_run(store, "synth", weight_tolerance=2)
    with pytest.raises(ValueError, match="unknown run 'nope'"):
        validate_run(store, "nope")
