"""Replay a registered probe set through a model: its routing of exactly those tokens, tagged with the set.

    from moescope.probe.replay import replay
    replay(model, store, "held-out", run="my-run", checkpoint="step-1000", step=1000)

Every sequence is recorded with probe_set = the set's name and seq = its index in the
set (phase "eval"), so drift metrics join checkpoints and model versions on
(probe_set, seq, pos) with equal token ids. `moescope replay` does the same for
checkpoint files of the reference model (`save_reference_checkpoint` writes them).
"""
from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from moescope.probe.attach import attach
from moescope.probe.sinks import LocalSink
from moescope.schema import check_run_id

REFERENCE_MODEL = "moescope.kernels.MoETransformer"


class ReplayError(ValueError):
    """A replay that cannot run, or did not record every token; the message says why."""


def replay(model: nn.Module, store, probe_set: str, *, run: str, checkpoint: str, step: int | None = None,
           path: str | None = None, batch_size: int = 16, spec=None, tokenizer=None) -> dict:
    """Run every sequence of `probe_set` through `model` and record its routing as `checkpoint` of `run`.

    step: the checkpoint's training step (default: the step it is registered with in the
    run). A checkpoint already replayed through this probe set is refused, so its rows
    are never counted twice. tokenizer: as attach() takes it, to record the text of the set's tokens.
    Returns {"checkpoint", "step", "sequences", "tokens", "layers"}.
    """
    ps = store.probe_set(probe_set)  # UnknownProbeSet names the registered ones
    check_run_id(run)
    if not isinstance(checkpoint, str) or not checkpoint:
        raise ReplayError(f"checkpoint must be a non-empty string, got {checkpoint!r}")
    step = _step_of(store, run, checkpoint, step)
    _check_fits(model, ps, probe_set)
    if _replayed(store, run, checkpoint, probe_set):
        raise ReplayError(f"checkpoint {checkpoint!r} of run {run!r} is already replayed through probe set {probe_set!r}")
    store.add_checkpoint(run, checkpoint, step, None if path is None else str(path))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    sink = LocalSink(store.root, store.database_url)
    try:
        with attach(model, sink=sink, run=run, checkpoint=checkpoint, step=step, sample_rate=1.0, spec=spec,
                    tokenizer=tokenizer, producer=f"replay-{probe_set}-{uuid.uuid4().hex[:12]}") as probe:
            with torch.no_grad():
                for first, ids_BS, mask_BS, domains in ps.batches(batch_size):
                    probe.set_probe_set(probe_set, first)
                    probe.set_domains(domains)
                    model(ids_BS.to(device), attention_mask=mask_BS.to(device))
                    probe.flush()  # a frame per batch: per-token rows never exceed the host budget
            stats = probe.stats()
    finally:
        sink.close()
        model.train(was_training)
    lost = stats["dropped_token_captures"] + stats["dropped_captures"] + stats["dropped_frames"] + stats["failures"]
    recorded = int(store.sql("SELECT count(*) AS n FROM token_stats WHERE checkpoint = ? AND probe_set = ?",
                             [checkpoint, probe_set], run=run).n.iloc[0])
    if lost or recorded != ps.tokens * stats["sites"]:
        raise ReplayError(f"replay of probe set {probe_set!r} as {run!r}/{checkpoint!r} recorded {recorded} token rows, "
                          f"expected {ps.tokens} tokens x {stats['sites']} routers ({lost} captures lost); "
                          "the model must route every unpadded token of input_ids")
    return {"checkpoint": checkpoint, "step": step, "sequences": len(ps), "tokens": ps.tokens, "layers": stats["sites"]}


def _check_fits(model: nn.Module, ps, name: str) -> None:
    """Refuse before recording anything when the model's declared context is shorter than a sequence."""
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    limit = getattr(cfg, "max_seq_len", None) or getattr(cfg, "max_position_embeddings", None)
    longest = max(s.size for s in ps.sequences)
    if isinstance(limit, int) and longest > limit:
        raise ReplayError(f"probe set {name!r} has sequences of {longest} tokens; the model takes at most {limit}")


def _step_of(store, run: str, checkpoint: str, step) -> int:
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, int):
            raise ReplayError(f"step must be an int, got {step!r}")
        return step
    known = _registered(store, run)
    if checkpoint in known and known[checkpoint][0] is not None:
        return int(known[checkpoint][0])
    raise ReplayError(f"the step of checkpoint {checkpoint!r} is unknown in run {run!r}: pass step=")


def _registered(store, run: str) -> dict[str, tuple]:
    """{checkpoint: (step, path)} registered for `run` (empty for a new run)."""
    from moescope.collector.store import UnknownRun

    try:
        ckpts = store.checkpoints(run)
    except UnknownRun:
        return {}
    return {r.checkpoint: (None if pd.isna(r.step) else int(r.step), r.path) for r in ckpts.itertuples()}


def _replayed(store, run: str, checkpoint: str, probe_set: str) -> bool:
    found = store.sql("SELECT count(*) AS n FROM token_stats WHERE checkpoint = ? AND probe_set = ?",
                      [checkpoint, probe_set], run=run)
    return int(found.n.iloc[0]) > 0


# ---------------------------------------------------------------- reference-model checkpoint files
def save_reference_checkpoint(model: nn.Module, path: str | Path, step: int) -> Path:
    """Save the reference model with its config and step, so `moescope replay` can rebuild it."""
    from moescope.kernels import MoETransformer

    if not isinstance(model, MoETransformer):
        raise TypeError(f"save_reference_checkpoint() takes a {REFERENCE_MODEL}, got {type(model).__name__}")
    path = Path(path)
    config = dataclasses.asdict(model.cfg)
    torch.save({"model": REFERENCE_MODEL, "config": config, "step": int(step), "state_dict": model.state_dict()}, path)
    return path


def load_reference_checkpoint(path: str | Path) -> tuple[nn.Module, int | None]:
    """(model, step) from a file written by save_reference_checkpoint; ReplayError says what else is unsupported."""
    from moescope.kernels import MoEConfig, ModelConfig, MoETransformer

    path = Path(path)
    if not path.is_file():
        raise ReplayError(f"checkpoint file {str(path)!r} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for foreign or corrupt files
        raise ReplayError(f"cannot read checkpoint {str(path)!r} as a torch file of tensors: "
                          f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__}") from None
    if not isinstance(data, dict) or "model" not in data:
        raise ReplayError(f"checkpoint {str(path)!r} holds no model config (a bare state_dict?): `moescope replay` "
                          f"rebuilds only the reference model ({REFERENCE_MODEL}) from files written by "
                          "moescope.probe.replay.save_reference_checkpoint; for other models call "
                          "moescope.probe.replay.replay(model, store, ...) from Python")
    if data["model"] != REFERENCE_MODEL:
        raise ReplayError(f"checkpoint {str(path)!r} is a {data['model']!r} model; `moescope replay` rebuilds only "
                          f"{REFERENCE_MODEL}; for other models call moescope.probe.replay.replay(model, store, ...)")
    try:
        cfg_dict = dict(data["config"])
        cfg = ModelConfig(**{**cfg_dict, "moe": MoEConfig(**cfg_dict["moe"])})
        model = MoETransformer(cfg)
        model.load_state_dict(data["state_dict"])
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        raise ReplayError(f"checkpoint {str(path)!r} does not rebuild the reference model: "
                          f"{str(exc).strip().splitlines()[0][:200]}") from None
    step = data.get("step")
    return model, (int(step) if isinstance(step, int) and not isinstance(step, bool) else None)


def replay_checkpoint_files(store, run: str, probe_set: str, paths: list[str | Path], *, batch_size: int = 16,
                            device: str = "cpu") -> list[dict]:
    """`moescope replay`: each reference-model checkpoint file through the probe set, in the given order.

    A file registered as a checkpoint of `run` keeps its name and step; any other is
    named after the file (its stem) with the step saved in it. Everything is checked
    before the first replay, so a mistake records nothing.
    """
    ps = store.probe_set(probe_set)
    check_run_id(run)
    if not paths:
        raise ReplayError("give at least one checkpoint file")
    by_path = {str(Path(p).resolve()): (name, st) for name, (st, p) in _registered(store, run).items() if p}
    plan = []
    for p in paths:
        model, saved_step = load_reference_checkpoint(p)
        _check_fits(model, ps, probe_set)
        name, step = by_path.get(str(Path(p).resolve()), (Path(p).stem, None))
        step = step if step is not None else saved_step
        if step is None:
            raise ReplayError(f"checkpoint {str(p)!r} records no step and is not registered in run {run!r}")
        if _replayed(store, run, name, probe_set):
            raise ReplayError(f"checkpoint {name!r} of run {run!r} is already replayed through probe set {probe_set!r}")
        plan.append((name, step, p))
    if len({name for name, _, _ in plan}) != len(plan):
        raise ReplayError(f"checkpoint names repeat: {[name for name, _, _ in plan]}")
    done = []
    for name, step, p in plan:
        model, _ = load_reference_checkpoint(p)
        done.append(replay(model.to(device), store, probe_set, run=run, checkpoint=name, step=step,
                           path=str(Path(p).resolve()), batch_size=batch_size))
    return done
