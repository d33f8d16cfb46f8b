"""Routing metrics of METRICS.md as SQL over the store, plus alert rules.

    from moescope.analysis import compute_metric, METRICS
    df = compute_metric(store, "maxvio", "my-run", layers=[3], steps=(0, 5000), by="window")

Every metric reads through the store (`store.sql`), never opening a connection itself.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from moescope.analysis import (balance, collapse, device_load, drift, expert_cache, health, placement, specialisation,
                               whatif)
from moescope.analysis.query import layer_meta, make_scope


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[..., pd.DataFrame]
    source: str          # the table it reads
    default_by: str      # "step" for time series, "window" for whole-window summaries
    summary: str

    @property
    def doc(self) -> str:
        return self.fn.__doc__ or ""


METRICS: dict[str, Metric] = {m.name: m for m in [
    Metric("load_share", balance.load_share, "expert_step", "step", "share of assignments per expert"),
    Metric("switch_score", balance.switch_score, "expert_step", "step", "Switch balance score E·Σ f_i·P_i"),
    Metric("maxvio", balance.maxvio, "expert_step", "step", "maximal violation of balance"),
    Metric("cv", balance.cv, "expert_step", "step", "coefficient of variation of load"),
    Metric("utilisation", balance.utilisation, "expert_step", "step", "load over fair share"),
    Metric("dead_experts", balance.dead_experts, "expert_step", "window", "dead and starved experts"),
    Metric("drop_rate", balance.drop_rate, "expert_step", "step", "dropped slots over all slots"),
    Metric("balance", balance.balance, "expert_step", "step", "maxvio, cv, switch_score and drop_rate from one read"),
    Metric("predicted_drops", whatif.predicted_drops, "expert_step", "window", "drops under other capacity factors"),
    Metric("placement", placement.placement, "expert_step", "step", "expert placement over EP devices: balance, all-to-all bytes"),
    Metric("device_load", device_load.device_load, "expert_step", "step", "tokens per device under the run's expert -> device map; balancedness"),
    Metric("expert_cache", expert_cache.expert_cache, "routing", "window", "hot-set coverage and LRU/LFU hit rates per cache size"),
    Metric("entropy", health.entropy, "token_step", "step", "per-token router entropy (nats)"),
    Metric("z", health.z, "token_step", "step", "router z-loss"),
    Metric("margin", health.margin, "token_step", "step", "top-1 minus top-2 probability"),
    Metric("domain_specialisation", specialisation.domain_specialisation, "domain_step", "window", "share of a domain's tokens per expert"),
    Metric("vocab_specialisation", specialisation.vocab_specialisation, "routing", "window", "share of a token id's occurrences per expert"),
    Metric("coactivation", specialisation.coactivation, "coact_step", "window", "how often expert j fires with expert i"),
    Metric("repetition", specialisation.repetition, "repeat_step", "window", "adjacent tokens sharing experts"),
    Metric("saturation", drift.saturation, "routing", "window", "overlap with the reference checkpoint's experts"),
    Metric("fluctuation", drift.fluctuation, "routing", "window", "last checkpoint where the top-1 changed (CDF)"),
    Metric("load_js", drift.load_js, "expert_step", "window", "Jensen–Shannon divergence of load between checkpoints"),
    Metric("alignment", drift.alignment, "routing", "window", "Hungarian expert matching between two models"),
    Metric("collapse", collapse.collapse, "expert_step", "window", "collapse verdict, onset step and evidence per layer"),
]}


def compute_metric(store, name: str, run: str, *, layers=None, steps=None, checkpoint=None, by: str | None = None,
                   phase: str | None = None, ranks=None, **options) -> pd.DataFrame:
    """One metric of METRICS.md for one run, as a DataFrame.

    layers: list of layer ids (default all); steps: (lo, hi) inclusive; checkpoint: only
    rows of that checkpoint; by: "step" (a row per step) or "window" (one summary over
    the selection), default per metric; phase: "train" / "eval" / "prefill" / "decode";
    ranks: list of ranks whose rows count (default every rank, summed).
    Metric-specific options go in **options (e.g. threshold=, position_buckets=,
    checkpoint_a=, run_b=). Unknown metric or bad argument: ValueError; unknown run: UnknownRun.
    """
    metric = METRICS.get(name) if isinstance(name, str) else None
    if metric is None:
        raise ValueError(f"unknown metric {name!r}; valid metrics: {', '.join(METRICS)}")
    scope = make_scope(run, layers=layers, steps=steps, checkpoint=checkpoint, by=by or metric.default_by, phase=phase,
                       ranks=ranks)
    store.require_run(run)
    with store.reading(run):  # one DuckDB connection and one segment listing for all of the metric's queries
        return metric.fn(store, scope, layer_meta(store, run), **options).reset_index(drop=True)


__all__ = ["METRICS", "Metric", "compute_metric"]
