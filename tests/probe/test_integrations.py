"""Trainer / Lightning callbacks and one-shot generate probing."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from fake_moe import FakeLM, batch, fake_sites  # noqa: E402

from moescope.probe import MemorySink  # noqa: E402
from moescope.probe.integrations import MoEScopeTrainerCallback, _LightningHooks, lightning_callback, probed_generate  # noqa: E402


def test_trainer_callback_follows_the_transformers_callback_protocol(tmp_path):
    from transformers import TrainerCallback, TrainerControl, TrainerState

    model = FakeLM()
    ids, mask = batch()
    sink = MemorySink()
    cb = MoEScopeTrainerCallback(sink=sink, run="hf-run", sites=fake_sites(model))
    assert isinstance(cb, TrainerCallback)
    args, state, control = SimpleNamespace(output_dir=str(tmp_path)), TrainerState(), TrainerControl()
    cb.on_train_begin(args, state, control, model=model)
    for step in range(3):
        cb.on_step_begin(args, state, control, model=model)
        model(ids, attention_mask=mask)
        state.global_step += 1
    cb.on_save(args, state, control)
    cb.on_train_end(args, state, control)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    df = cb.probe.tables()["routing"].to_pandas()
    assert sorted(df.step.unique()) == [0, 1, 2]
    ckpts = [c for f in sink.frames for c in f.meta.get("checkpoints", [])]
    assert {"checkpoint": "checkpoint-3", "step": 3, "path": str(tmp_path / "checkpoint-3")} in ckpts
    assert sink.frames[-1].final


def test_lightning_hooks_attach_label_and_detach():
    # Lightning is not installed here; the hooks are driven the way its Trainer calls them.
    model = FakeLM()
    ids, mask = batch()
    sink = MemorySink()
    cb = _LightningHooks(sink=sink, run="pl-run", sites=fake_sites(model))
    trainer = SimpleNamespace(global_step=5)
    cb.on_train_start(trainer, model)
    for i in range(2):
        cb.on_train_batch_start(trainer, model, (ids, mask), i)
        model(ids, attention_mask=mask)
        trainer.global_step += 1
    cb.on_save_checkpoint(trainer, model, {})
    cb.on_train_end(trainer, model)
    assert sorted(cb.probe.tables()["routing"].to_pandas().step.unique()) == [5, 6]
    assert any(c["checkpoint"] == "step-7" for f in sink.frames for c in f.meta.get("checkpoints", []))


def test_lightning_callback_explains_missing_lightning():
    try:
        import lightning  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs lightning"):
            lightning_callback(sink="memory")
    else:
        cb = lightning_callback(sink="memory")
        assert isinstance(cb, _LightningHooks)


def test_probed_generate_records_prefill_then_decode():
    model = FakeLM(layers=2).eval()
    ids = torch.tensor([[3, 4, 5, 6]])
    out, probe = probed_generate(model, run="gen", sites=fake_sites(model), input_ids=ids, max_new_tokens=3)
    assert out.shape == (1, 7)
    ts = probe.tables()["token_stats"].to_pandas()
    assert sorted(ts[ts.phase == "prefill"].pos.unique()) == [0, 1, 2, 3]
    assert sorted(ts[ts.phase == "decode"].pos.unique()) == [4, 5]
