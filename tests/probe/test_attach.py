"""Attaching and detaching: outputs untouched, failures contained, frames numbered, phases."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from fake_moe import FakeAdapter, FakeLM, batch, fake_sites  # noqa: E402

from moescope.probe import MemorySink, attach  # noqa: E402
from moescope.schema import SchemaError  # noqa: E402


def hook_counts(model):
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]


def test_outputs_and_gradients_are_bit_identical_with_and_without_probe():
    model = FakeLM(capacity_factor=1.0)
    ids, mask = batch()
    model.train()
    ref = model(ids, attention_mask=mask, labels=ids)
    ref["loss"].backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with attach(model, sink="memory", run="same", sites=fake_sites(model)) as probe:
        out = model(ids, attention_mask=mask, labels=ids)
        out["loss"].backward()
    assert torch.equal(ref["logits"], out["logits"]) and torch.equal(ref["loss"], out["loss"])
    assert all(torch.equal(a, p.grad) for a, p in zip(ref_grads, model.parameters()))
    assert probe.stats()["failures"] == 0 and probe.stats()["rows"] > 0


class FailingAdapter(FakeAdapter):
    def capture(self, site, module, args, kwargs, output):
        if site.layer == 1:
            raise RuntimeError("adapter bug")
        return super().capture(site, module, args, kwargs, output)


def test_adapter_exceptions_are_counted_not_raised(caplog):
    model = FakeLM(layers=2)
    ids, mask = batch()
    ref = model(ids, attention_mask=mask)
    with attach(model, sink="memory", run="fail", sites=fake_sites(model, FailingAdapter())) as probe:
        outs = [model(ids, attention_mask=mask) for _ in range(3)]
    assert all(torch.equal(ref, o) for o in outs)
    stats = probe.stats()
    assert stats["failures"] == 3 and stats["failure_sites"] == {"layers.1.moe": 3}
    assert sum("adapter bug" in r.getMessage() for r in caplog.records) == 1, "logged once"
    assert set(probe.tables()["routing"].column("layer").to_pylist()) == {0}


def test_hooks_are_removed_after_with_even_on_error():
    model = FakeLM()
    before = hook_counts(model)
    with pytest.raises(ZeroDivisionError):
        with attach(model, sink="memory", run="err", sites=fake_sites(model)):
            assert hook_counts(model) != before
            1 / 0
    assert hook_counts(model) == before


def test_detach_removes_hooks_and_is_idempotent():
    model = FakeLM()
    before = hook_counts(model)
    probe = attach(model, sink="memory", run="det", sites=fake_sites(model))
    probe.detach()
    probe.detach()
    assert hook_counts(model) == before
    model(*batch())
    assert probe.tables()["routing"].num_rows == 0


def test_frames_have_monotonic_seq_and_a_final_frame():
    model = FakeLM()
    ids, mask = batch()
    sink = MemorySink()
    with attach(model, sink=sink, run="seq", sites=fake_sites(model), frame_rows=1) as probe:
        for step in range(5):
            probe.set_step(step)
            model(ids, attention_mask=mask)
    seqs = [f.seq for f in sink.frames]
    assert seqs == list(range(len(seqs))) and len(seqs) >= 6
    assert [f.final for f in sink.frames] == [False] * (len(seqs) - 1) + [True]
    assert sink.frames[0].meta["layers"][1]["module_path"] == "layers.1.moe"
    assert all("layers" not in f.meta for f in sink.frames[1:])
    assert probe.stats()["frames"] == len(seqs)


def test_step_microbatch_and_checkpoint_labels():
    model = FakeLM()
    ids, mask = batch()
    sink = MemorySink()
    with attach(model, sink=sink, run="lab", checkpoint="ck-0", step=10, sites=fake_sites(model)) as probe:
        model(ids, attention_mask=mask)
        model(ids, attention_mask=mask)
        probe.next_step()
        model(ids, attention_mask=mask)
        probe.set_checkpoint("ck-1", step=20, path="/tmp/ck1.pt")
        model.eval()
        model(ids, attention_mask=mask)
    df = probe.tables()["expert_step"].to_pandas()
    got = sorted(set(zip(df.checkpoint, df.step, df.phase)))
    assert got == [("ck-0", 10, "train"), ("ck-0", 11, "train"), ("ck-1", 20, "eval")]
    rt = probe.tables()["routing"].to_pandas()
    assert sorted(set(zip(rt.step, rt.microbatch))) == [(10, 0), (10, 1), (11, 0), (20, 0)]
    ckpts = [c for f in sink.frames for c in f.meta.get("checkpoints", [])]
    assert {"checkpoint": "ck-1", "step": 20, "path": "/tmp/ck1.pt"} in ckpts
    assert ckpts[0] == {"checkpoint": "ck-0", "step": 10, "path": None}


def test_generate_records_prefill_and_decode_with_continuing_positions():
    model = FakeLM(layers=1).eval()
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # left padding, as generate() uses
    with attach(model, sink="memory", run="gen", sites=fake_sites(model)) as probe:
        out = probe.generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=3)
    ts = probe.tables()["token_stats"].to_pandas()
    prefill, decode = ts[ts.phase == "prefill"], ts[ts.phase == "decode"]
    assert sorted(zip(prefill.seq, prefill.pos)) == [(0, 0), (0, 1), (0, 2)] + [(1, p) for p in range(5)]
    assert sorted(zip(decode.seq, decode.pos)) == [(0, 3), (0, 4), (1, 5), (1, 6)]
    dec = decode.sort_values(["seq", "pos"])
    assert dec.token_id.tolist() == [out[0, 5].item(), out[0, 6].item(), out[1, 5].item(), out[1, 6].item()]


def test_torch_compile_records_the_same_decisions():
    model = FakeLM(layers=2)
    ids, mask = batch()
    with attach(model, sink="memory", run="eager", sites=fake_sites(model)) as eager:
        ref = model(ids, attention_mask=mask)
    compiled = torch.compile(model, backend="aot_eager")
    with attach(model, sink="memory", run="eager", sites=fake_sites(model)) as probe:
        out = compiled(ids, attention_mask=mask)
    torch.testing.assert_close(out, ref)
    a, b = eager.tables(), probe.tables()
    key = ["layer", "seq", "pos", "slot"]
    ra, rb = a["routing"].to_pandas().sort_values(key), b["routing"].to_pandas().sort_values(key)
    assert len(ra) == len(rb) > 0
    assert (ra.expert.to_numpy() == rb.expert.to_numpy()).all()
    assert probe.stats()["failures"] == 0


def test_host_memory_budget_drops_token_rows_but_keeps_exact_aggregates():
    model = FakeLM()
    ids, mask = batch()
    with attach(model, sink="memory", run="full", sites=fake_sites(model)) as full:
        for _ in range(4):
            model(ids, attention_mask=mask)
    with attach(model, sink="memory", run="tight", sites=fake_sites(model), max_host_bytes=1_000) as tight:
        for _ in range(4):
            model(ids, attention_mask=mask)
            # Let the background thread release each forward's bytes, so only the per-token
            # budget (not thread scheduling on a loaded machine) decides what is dropped.
            tight.flush()
    stats = tight.stats()
    assert stats["dropped_token_captures"] == 4 and stats["dropped_captures"] == 0
    assert tight.tables()["routing"].num_rows == 0
    cols = ["tokens", "top1", "num_tokens"]
    a = full.tables()["expert_step"].to_pandas().groupby(["layer", "expert"])[cols].sum()
    b = tight.tables()["expert_step"].to_pandas().groupby(["layer", "expert"])[cols].sum()
    assert a.equals(b)
    assert stats["peak_host_bytes"] <= 1_000


def test_router_calls_outside_the_model_forward_are_not_recorded():
    model = FakeLM()
    with attach(model, sink="memory", run="out", sites=fake_sites(model)) as probe:
        model.layers[0](torch.randn(1, 3, 16))
    assert probe.stats()["calls_outside_forward"] == 1
    assert probe.tables()["routing"].num_rows == 0


def test_bad_arguments_give_one_line_errors():
    model = FakeLM()
    with pytest.raises(SchemaError, match="invalid run id"):
        attach(model, sink="memory", run="../etc", sites=fake_sites(model))
    with pytest.raises(ValueError, match="sample_rate"):
        attach(model, sink="memory", run="ok", sample_rate=1.5, sites=fake_sites(model))
    with pytest.raises(ValueError, match="unknown sink"):
        attach(model, sink="kafka://x", run="ok", sites=fake_sites(model))
    assert hook_counts(model) == [0] * len(hook_counts(model))


def test_model_without_router_raises_no_router_found():
    from moescope.probe.adapters import NoRouterFound

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(NoRouterFound) as err:
        attach(model, sink="memory", run="none")
    assert "\n" not in str(err.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_forward_with_probe_never_syncs_with_the_host():
    model = FakeLM(layers=2).cuda()
    ids, mask = (t.cuda() for t in batch())
    ref = model(ids, attention_mask=mask)
    with attach(model, sink="memory", run="cuda", sites=fake_sites(model)) as probe:
        model(ids, attention_mask=mask)  # warm-up allocations outside the checked region
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = model(ids, attention_mask=mask)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(ref, out)
    assert probe.stats()["failures"] == 0
    assert probe.tables()["routing"].num_rows == 2 * int(mask.sum()) * 2 * 2
