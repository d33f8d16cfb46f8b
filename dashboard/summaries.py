"""Per-run health at a glance (the Runs page and /api/runs/health), from moescope.analysis only."""
from __future__ import annotations

import math
import time

import pandas as pd

from moescope.analysis import METRICS, compute_metric
from moescope.collector.store import Store
from moescope.dashboard import prometheus

WINDOW_STEPS = 50   # "latest" = the last 50 steps, the alert rules' default window
LIVE_S = 120.0      # a run written to this recently is recording


def series_phase(store: Store, run: str) -> str | None:
    """The phase the over-steps charts follow: training when the run trained (replays of
    checkpoints through a probe set sit at checkpoint steps and would zigzag the series),
    else every phase (serving, eval-only runs)."""
    return _trained(store, run)[0]


def _trained(store: Store, run: str) -> tuple[str | None, pd.DataFrame]:
    """series_phase and the run's training drop rate per layer it was read from."""
    trained = compute_metric(store, "drop_rate", run=run, by="window", phase="train")
    return ("train" if not trained.empty and trained["slots"].fillna(0).sum() > 0 else None), trained


def last_step(store: Store, run: str, phase: str | None, ranks: list[int] | None = None,
              overall: pd.DataFrame | None = None) -> int | None:
    """The newest step with expert load in `phase` (read from one layer's per-step drop rate); `overall`: the
    phase's drop rate per layer over the whole run, when the caller has it."""
    if overall is None:
        overall = compute_metric(store, "drop_rate", run=run, by="window", phase=phase, ranks=ranks)
    if overall.empty:
        return None
    first = int(overall["layer"].min())
    steps = compute_metric(store, "drop_rate", run=run, by="step", layers=[first], phase=phase, ranks=ranks)
    return None if steps.empty else int(steps["step"].max())


def _finite(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def status(last_write: float | None, closed: bool, now: float) -> str:
    if last_write is None:
        return "empty"
    if now - last_write <= LIVE_S:
        return "recording"
    return "closed" if closed else "idle"


def collapse_table(store: Store, run: str, detail: str = "layers", ranks: list[int] | None = None) -> pd.DataFrame | None:
    """compute_metric("collapse", run, detail=detail), or None where the collapse metric is not available.
    The fit is kept by the analysis library until the run writes again (analysis/collapse.py)."""
    if "collapse" not in METRICS:
        return None
    return compute_metric(store, "collapse", run=run, detail=detail, ranks=ranks)


def collapse_verdict(store: Store, run: str, ranks: list[int] | None = None) -> str | None:
    """The worst collapse verdict over the run's layers and the layers that have it, e.g. "collapsing (layer 3)" or
    "collapsed (60 of 64 layers: 0–5, 7–23, 25–58, 60–63)"; None where the collapse metric is not available."""
    return worst_collapse(store, run, ranks)[0]


def worst_collapse(store: Store, run: str, ranks: list[int] | None = None) -> tuple[str | None, int | None]:
    """collapse_verdict, and the first layer with that verdict (None when every layer is healthy): the layer to open."""
    verdicts = collapse_table(store, run, ranks=ranks)
    if verdicts is None or verdicts.empty:
        return None, None
    from moescope.analysis.collapse import VERDICTS  # ordered from healthy to collapsed

    worst = max(verdicts["verdict"], key=VERDICTS.index)
    if worst == "healthy":
        return worst, None
    layers = verdicts.loc[verdicts["verdict"] == worst, "layer"]
    first = int(layers.min())
    if len(layers) == 1:
        return f"{worst} (layer {first})", first
    return f"{worst} ({len(layers)} of {len(verdicts)} layers: {id_ranges(layers)})", first


def id_ranges(ids) -> str:
    """Sorted ids with consecutive runs joined: [1, 2, 3, 7, 9, 10] -> "1–3, 7, 9–10" (64 layers, 256 experts)."""
    runs: list[list[int]] = []
    for i in sorted(int(i) for i in ids):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}–{b}" for a, b in runs)


def run_health(store: Store, run: str, *, firing: int = 0, now: float | None = None,
               last_write: float | None = None, routing_rows: int = 0, ranks: list[int] | None = None) -> dict:
    """One run's health over its last WINDOW_STEPS steps: MaxVio (mean over layers), dead experts
    (summed over layers, out of `experts`, every layer's E summed), drop rate, alerts firing, recording status; from the rows of `ranks` only when given
    (alerts, status and routing rows stay the run's)."""
    with store.reading(run):  # one segment listing and one connection for the run's seven metric calls
        now = time.time() if now is None else now
        phase, trained = _trained(store, run)
        last = last_step(store, run, phase, ranks, trained if phase == "train" and ranks is None else None)
        row = {"run": run, "phase": phase or "all", "last_step": last, "window_steps": WINDOW_STEPS, "maxvio": None,
               "dead_experts": None, "experts": None, "drop_rate": None, "collapse": None, "collapse_layer": None,
               "alerts_firing": int(firing),
               "last_write": _finite(last_write), "routing_rows": int(routing_rows)}
        ledger = store.ledger(run)
        row["status"] = status(row["last_write"], bool(len(ledger)) and bool(ledger["closed"].all()), now)
        if last is None:
            return row
        steps = (last - WINDOW_STEPS + 1, last)
        maxvio = compute_metric(store, "maxvio", run=run, steps=steps, by="window", phase=phase, ranks=ranks)
        dead = compute_metric(store, "dead_experts", run=run, steps=steps, by="window", phase=phase, ranks=ranks)
        drops = compute_metric(store, "drop_rate", run=run, steps=steps, by="window", phase=phase, ranks=ranks)
        if not maxvio.empty:
            row["maxvio"] = _finite(maxvio["maxvio_global_mean_layers"].iloc[0])
        if not dead.empty:
            row["dead_experts"], row["experts"] = int(dead["dead"].sum()), int(dead["num_experts"].sum())
        row["collapse"], row["collapse_layer"] = worst_collapse(store, run, ranks)
        if not drops.empty and drops["slots"].sum() > 0:
            row["drop_rate"] = float(drops["dropped"].sum() / drops["slots"].sum())
        return row


def runs_health(store: Store, now: float | None = None, ranks: list[int] | None = None) -> pd.DataFrame:
    """run_health for every recorded run, newest first (from the rows of `ranks` only when given)."""
    runs = store.runs()
    firing: dict[str, int] = {}
    for event in prometheus.firing_alerts(store):
        firing[event["run"]] = firing.get(event["run"], 0) + 1
    rows = [run_health(store, r.run, firing=firing.get(r.run, 0), now=now, last_write=_finite(r.last_write),
                       routing_rows=r.routing_rows, ranks=ranks) for r in runs.iloc[::-1].itertuples()]
    columns = ["run", "status", "phase", "last_step", "window_steps", "maxvio", "dead_experts", "experts", "drop_rate",
               "collapse", "collapse_layer", "alerts_firing", "last_write", "routing_rows"]
    return pd.DataFrame(rows, columns=columns)
