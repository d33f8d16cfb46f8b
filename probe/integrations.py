"""Attach the probe from training frameworks: transformers Trainer and PyTorch Lightning.

Both callbacks attach on train begin, label every step, register each saved
checkpoint and detach (sending the final frame) on train end. They share one
implementation, `_ProbeCallbackCore`, so the framework classes are thin.
"""
from __future__ import annotations

import os
from typing import Any

from moescope.probe.attach import Probe, attach

__all__ = ["MoEScopeTrainerCallback", "lightning_callback", "probed_generate"]


class _ProbeCallbackCore:
    def __init__(self, sink: Any = "local", run: str = "default", **attach_kwargs):
        self.sink, self.run, self.attach_kwargs = sink, run, attach_kwargs
        self.probe: Probe | None = None

    def _attach(self, model, step: int) -> None:
        if self.probe is None and model is not None:
            self.probe = attach(model, sink=self.sink, run=self.run, step=int(step), **self.attach_kwargs)

    def _step(self, step: int) -> None:
        if self.probe is not None:
            self.probe.set_step(int(step))

    def _checkpoint(self, name: str, step: int, path: str | None) -> None:
        if self.probe is not None:
            self.probe.set_checkpoint(name, step=int(step), path=path)

    def _detach(self) -> None:
        if self.probe is not None:
            self.probe.detach()


def _trainer_callback_base():
    try:
        from transformers import TrainerCallback

        return TrainerCallback
    except ImportError:  # transformers absent: the class still works when called by hand
        return object


class MoEScopeTrainerCallback(_ProbeCallbackCore, _trainer_callback_base()):
    """`Trainer(..., callbacks=[MoEScopeTrainerCallback(sink="local", run="my-run")])`."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._attach(model, state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        self._step(state.global_step)

    def on_save(self, args, state, control, **kwargs):
        name = f"checkpoint-{state.global_step}"  # the folder name Trainer saves to
        out = getattr(args, "output_dir", None)
        self._checkpoint(name, state.global_step, os.path.join(out, name) if out else None)

    def on_train_end(self, args, state, control, **kwargs):
        self._detach()


class _LightningHooks(_ProbeCallbackCore):
    """The documented Lightning Callback hooks, separate from the base class so they can be tested."""

    def on_train_start(self, trainer, pl_module):
        self._attach(pl_module, trainer.global_step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step(trainer.global_step)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self._checkpoint(f"step-{trainer.global_step}", trainer.global_step, None)

    def on_train_end(self, trainer, pl_module):
        self._detach()

    def on_exception(self, trainer, pl_module, exception):
        self._detach()


def lightning_callback(sink: Any = "local", run: str = "default", **attach_kwargs):
    """A `lightning.Callback` that probes the LightningModule; ImportError when Lightning is absent."""
    try:
        from lightning.pytorch import Callback
    except ImportError:
        try:
            from pytorch_lightning import Callback
        except ImportError:
            raise ImportError("lightning_callback() needs lightning (pip install lightning)") from None
    cls = type("MoEScopeLightningCallback", (_LightningHooks, Callback), {})
    return cls(sink=sink, run=run, **attach_kwargs)


def probed_generate(model, *, sink: Any = "memory", run: str = "default", **kwargs):
    """One-shot: attach, `model.generate(**kwargs)` with prefill/decode phases, detach; returns (output, probe)."""
    attach_kwargs = {k: kwargs.pop(k) for k in ("checkpoint", "step", "rank", "sample_rate", "spec", "sites", "producer")
                     if k in kwargs}
    with attach(model, sink=sink, run=run, **attach_kwargs) as probe:
        out = probe.generate(model, **kwargs)
    return out, probe
