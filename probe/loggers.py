"""Routing summaries into the user's own TensorBoard or W&B run: live from the probe, or from the store after the fact.

    from torch.utils.tensorboard import SummaryWriter
    from moescope.probe.loggers import log_to

    with attach(model, sink="local:./store", run="r") as probe:
        logger = log_to(probe, SummaryWriter("tb"))     # or a wandb run: log_to(probe, wandb.init(...))
        for step in ...:
            probe.set_step(step); train_step(); logger.flush()   # flush is optional: frames log as they arrive

Per step and MoE layer: scalars `moescope/maxvio/layer_<l>`, `moescope/drop_rate/layer_<l>`,
`moescope/entropy_mean/layer_<l>` (and `moescope/maxvio/mean_layers`); the per-token entropy
as a histogram `moescope/entropy/layer_<l>`; and every `image_every` steps the layer × expert
load-share heatmap as an image `moescope/load_share` (rows layers, columns experts, brighter
is more load; the colour scale is fixed at 0 … 2/E so images compare across steps).

MaxVio and drop rate come from the exact per-expert aggregates (expert_step), the entropy
from per-token rows (sampled when the probe samples), with the definitions of METRICS.md;
`export_tensorboard(store, run, logdir)` writes the same tags from a recorded run through the
analysis library (`moescope export RUN --tensorboard DIR`).
"""
from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

PREFIX = "moescope"
IMAGE_EVERY = 50
_PIXELS = 8  # each (layer, expert) cell is drawn as a square of this many pixels


@dataclass
class StepSummary:
    """One step's routing summary; arrays are per layer in `layers` order."""
    step: int
    layers: list[int]
    maxvio_L: np.ndarray
    drop_rate_L: np.ndarray
    entropy_mean_L: np.ndarray
    entropy_by_layer: dict[int, np.ndarray] = field(default_factory=dict)
    share_LE: np.ndarray | None = None   # load share per layer and expert (None: no image this step)


# ------------------------------------------------------------------ writing targets
class _TensorBoard:
    """torch.utils.tensorboard.SummaryWriter, tensorboardX, or anything with their add_* methods."""

    def __init__(self, writer):
        self.writer = writer

    def write(self, s: StepSummary, prefix: str) -> None:
        for tag, value in _scalars(s, prefix).items():
            self.writer.add_scalar(tag, value, s.step)
        for layer, values in s.entropy_by_layer.items():
            if len(values):
                self.writer.add_histogram(f"{prefix}/entropy/layer_{layer}", values, s.step)
        if s.share_LE is not None:
            self.writer.add_image(f"{prefix}/load_share", heatmap_image(s.share_LE), s.step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()


class _Wandb:
    """A wandb Run (wandb.init(...)): one run.log per step, at that step."""

    def __init__(self, run):
        self.run = run

    def write(self, s: StepSummary, prefix: str) -> None:
        import wandb

        row: dict = dict(_scalars(s, prefix))
        for layer, values in s.entropy_by_layer.items():
            if len(values):
                row[f"{prefix}/entropy/layer_{layer}"] = wandb.Histogram(values)
        if s.share_LE is not None:
            row[f"{prefix}/load_share"] = wandb.Image(heatmap_image(s.share_LE), caption="layers x experts load share")
        self.run.log(row, step=s.step)

    def flush(self) -> None:
        return None


def as_target(writer):
    """The writer wrapped for StepSummary; a clear error for anything that is neither TensorBoard nor W&B."""
    if hasattr(writer, "add_scalar") and hasattr(writer, "add_image"):
        return _TensorBoard(writer)
    if hasattr(writer, "log") and type(writer).__module__.startswith("wandb"):
        return _Wandb(writer)
    raise ValueError(f"cannot log routing summaries to a {type(writer).__name__}: pass a TensorBoard SummaryWriter "
                     "or a wandb run (wandb.init(...))")


def _scalars(s: StepSummary, prefix: str) -> dict[str, float]:
    out = {}
    for name, values in (("maxvio", s.maxvio_L), ("drop_rate", s.drop_rate_L), ("entropy_mean", s.entropy_mean_L)):
        for layer, value in zip(s.layers, values):
            if np.isfinite(value):
                out[f"{prefix}/{name}/layer_{layer}"] = float(value)
    if np.isfinite(s.maxvio_L).any():
        out[f"{prefix}/maxvio/mean_layers"] = float(np.nanmean(s.maxvio_L))
    return out


# A perceptually ordered ramp (dark blue -> teal -> yellow), interpolated; no plotting library needed.
_RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


def heatmap_image(share_LE: np.ndarray) -> np.ndarray:
    """Layer × expert load share as an RGB uint8 image (H, W, 3); the scale runs from 0 to twice the uniform share."""
    share_LE = np.nan_to_num(np.asarray(share_LE, dtype=np.float64))
    top = 2.0 / max(share_LE.shape[1], 1)
    x = np.clip(share_LE / top, 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_RAMP) - 2)
    frac = (x - lo)[..., None]
    rgb_LE3 = _RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac
    return np.repeat(np.repeat(rgb_LE3, _PIXELS, axis=0), _PIXELS, axis=1).round().astype(np.uint8)


# ------------------------------------------------------------------ live: from the probe's frames
def _maxvio(load_E: np.ndarray) -> float:
    mean = load_E.mean()
    return float((load_E.max() - mean) / mean) if mean > 0 else float("nan")


class RoutingLogger:
    """Turns the probe's frames into StepSummary and writes them; see `log_to`."""

    def __init__(self, writer, *, image_every: int = IMAGE_EVERY, prefix: str = PREFIX):
        if int(image_every) < 1:
            raise ValueError(f"image_every must be at least 1, got {image_every!r}")
        self.target, self.image_every, self.prefix = as_target(writer), int(image_every), prefix
        self.num_experts: dict[int, int] = {}
        self._agg: dict[int, list[pd.DataFrame]] = defaultdict(list)      # step -> expert_step parts
        self._entropy: dict[int, list[pd.DataFrame]] = defaultdict(list)  # step -> token_stats parts
        self._lock = threading.Lock()
        self.logged_steps: list[int] = []
        self._probe = None

    def on_frame(self, frame) -> None:
        """Takes one frame; steps older than the frame's newest are complete and are written now."""
        with self._lock:
            for entry in frame.meta.get("layers", []):
                self.num_experts[int(entry["layer"])] = int(entry["num_experts"])
            steps = set()
            agg = frame.tables.get("expert_step")
            if agg is not None and agg.num_rows:
                df = agg.select(["step", "layer", "expert", "tokens", "dropped"]).to_pandas()
                for step, part in df.groupby("step"):
                    self._agg[int(step)].append(part)
                steps |= set(int(s) for s in df.step.unique())
            stats = frame.tables.get("token_stats")
            if stats is not None and stats.num_rows:
                df = stats.select(["step", "layer", "entropy"]).to_pandas()
                for step, part in df.groupby("step"):
                    self._entropy[int(step)].append(part)
            if frame.final:
                self._write_through(None)
            elif steps:
                self._write_through(max(steps) - 1)

    def flush(self) -> None:
        """Everything the probe captured so far, written now (the current step included)."""
        if self._probe is not None:
            self._probe.flush()
        with self._lock:
            self._write_through(None)

    def _write_through(self, last: int | None) -> None:
        for step in sorted(s for s in set(self._agg) | set(self._entropy) if last is None or s <= last):
            self.target.write(self._summary(step, self._agg.pop(step, []), self._entropy.pop(step, [])), self.prefix)
            self.logged_steps.append(step)
        self.target.flush()

    def _summary(self, step: int, agg_parts: list[pd.DataFrame], ent_parts: list[pd.DataFrame]) -> StepSummary:
        agg = pd.concat(agg_parts) if agg_parts else pd.DataFrame(columns=["layer", "expert", "tokens", "dropped"])
        ent = pd.concat(ent_parts) if ent_parts else pd.DataFrame(columns=["layer", "entropy"])
        layers = sorted({int(x) for x in agg.layer} | {int(x) for x in ent.layer})
        width = max([self.num_experts.get(layer, 0) for layer in layers] + [int(agg.expert.max()) + 1 if len(agg) else 0])
        load_LE = np.zeros((len(layers), width))
        dropped_L = np.zeros(len(layers))
        for i, layer in enumerate(layers):
            rows = agg[agg.layer == layer]
            np.add.at(load_LE[i], rows.expert.to_numpy(int), rows.tokens.to_numpy(float))
            dropped_L[i] = rows.dropped.sum()
        maxvio_L = np.array([_maxvio(load_LE[i, :self.num_experts.get(layer, width)]) for i, layer in enumerate(layers)])
        slots_L = load_LE.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            drop_L = np.where(slots_L > 0, dropped_L / slots_L, np.nan)
            share_LE = load_LE / slots_L[:, None]
        entropy = {layer: ent.entropy[ent.layer == layer].to_numpy(np.float64) for layer in layers}
        mean_L = np.array([v.mean() if len(v) else np.nan for v in entropy.values()])
        image = share_LE if (step % self.image_every == 0 or not self.logged_steps) and len(agg) else None
        return StepSummary(step, layers, maxvio_L, drop_L, mean_L, entropy, image)


def log_to(probe, writer, *, image_every: int = IMAGE_EVERY, prefix: str = PREFIX) -> RoutingLogger:
    """Log `probe`'s routing summaries into `writer` (a TensorBoard SummaryWriter or a wandb run) as frames arrive.

    Frames still go to the probe's sink unchanged. A step is written once a later step's
    rows arrive, at `logger.flush()`, or when the probe detaches.
    """
    logger = RoutingLogger(writer, image_every=image_every, prefix=prefix)
    logger._probe = probe
    sink, send = probe.sink, probe.sink.send

    def send_and_log(frame) -> None:  # the sink keeps its own type (probe.tables() needs a MemorySink)
        send(frame)
        logger.on_frame(frame)

    sink.send = send_and_log
    return logger


# ------------------------------------------------------------------ after the fact: from the store
def store_summaries(store, run: str, *, image_every: int = IMAGE_EVERY, phase: str | None = None) -> list[StepSummary]:
    """StepSummary per recorded step of `run`, through the analysis library (compute_metric(..., by="step"))."""
    from moescope.analysis import compute_metric

    if int(image_every) < 1:
        raise ValueError(f"image_every must be at least 1, got {image_every!r}")
    store.require_run(run)
    with store.reading(run):
        maxvio = compute_metric(store, "maxvio", run, by="step", phase=phase)
        drops = compute_metric(store, "drop_rate", run, by="step", phase=phase)
        ent = compute_metric(store, "entropy", run, by="step", phase=phase, quantiles=False)
        per_token = store.sql("SELECT step, layer, entropy FROM token_stats WHERE run = ?"
                              + (" AND phase = ?" if phase else ""), [run, phase] if phase else [run], run=run)
        steps = sorted(set(maxvio.step) | set(ent.step))
        pictured = {s for s in steps if s % image_every == 0} | ({steps[0], steps[-1]} if steps else set())
        share = pd.concat([compute_metric(store, "load_share", run, by="step", steps=(s, s), phase=phase) for s in sorted(pictured)]) \
            if pictured else pd.DataFrame(columns=["step", "layer", "expert", "share"])
    out = []
    for step in steps:
        layers = sorted({int(x) for x in maxvio.layer[maxvio.step == step]} | {int(x) for x in ent.layer[ent.step == step]})
        def col(df, name, step=step):
            by_layer = dict(zip(df.layer[df.step == step].astype(int), df[name][df.step == step]))
            return np.array([float(by_layer.get(layer, np.nan)) if pd.notna(by_layer.get(layer, np.nan)) else np.nan
                             for layer in layers])
        tokens = per_token[per_token.step == step]
        entropy = {layer: tokens.entropy[tokens.layer == layer].to_numpy(np.float64) for layer in layers}
        image = None
        if step in pictured:
            s = share[share.step == step]
            image = s.pivot(index="layer", columns="expert", values="share").reindex(layers).fillna(0.0).to_numpy()
        out.append(StepSummary(int(step), layers, col(maxvio, "maxvio"), col(drops, "drop_rate"), col(ent, "mean"),
                               entropy, image))
    return out


def export_tensorboard(store, run: str, logdir: str | Path, *, image_every: int = IMAGE_EVERY, prefix: str = PREFIX) -> int:
    """Write `run`'s routing summaries as TensorBoard event files under `logdir`; returns the steps written."""
    from torch.utils.tensorboard import SummaryWriter

    summaries = store_summaries(store, run, image_every=image_every)
    writer = SummaryWriter(log_dir=str(logdir))
    try:
        target = _TensorBoard(writer)
        for summary in summaries:
            target.write(summary, prefix)
    finally:
        writer.close()
    return len(summaries)
