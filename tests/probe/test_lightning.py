"""The Lightning callback on a real `lightning.Trainer` (CPU, 2 steps, a user-written MoE).

The router is a plain nn.Linear + torch.topk inside the LightningModule, found by structure.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

L = pytest.importorskip("lightning")

sys.path.insert(0, str(Path(__file__).parent))
from test_structural import UserLM, V, tokens  # noqa: E402

from moescope.probe import MemorySink  # noqa: E402
from moescope.probe.integrations import lightning_callback  # noqa: E402


class TinyMoEModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.lm = UserLM(layers=2)

    def forward(self, input_ids):
        return self.lm(input_ids)

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        logits = self(ids)
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_trainer_records_each_step_and_the_saved_checkpoint(tmp_path):
    torch.manual_seed(0)
    module = TinyMoEModule()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens().repeat(2, 1)), batch_size=2)
    sink = MemorySink()
    callback = lightning_callback(sink=sink, run="lightning-run")
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=[callback])
    trainer.fit(module, data)
    assert trainer.global_step == 2
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules()) == 0, "detached"
    routing = callback.probe.tables()["routing"].to_pandas()
    assert sorted(routing.step.unique()) == [0, 1]
    assert sorted(routing.layer.unique()) == [0, 1]
    assert set(routing.phase.unique()) == {"train"}
    # Each step routes 2 sequences x 5 tokens x top-2 through each of the 2 layers.
    assert routing.groupby("step").size().tolist() == [2 * 5 * 2 * 2] * 2
    checkpoints = [c["checkpoint"] for f in sink.frames for c in f.meta.get("checkpoints", [])]
    assert "step-2" in checkpoints
    assert sink.frames[-1].final
