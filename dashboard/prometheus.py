"""The /metrics exposition through prometheus_client: ingest counters, alerts firing, and routing health.

Routing health covers each run's latest window of W steps (steps last-W+1 … last of its
expert_step rows), computed by the analysis library (store.metric(..., by="window")):

    moescope_routing_maxvio_ratio{run,layer}            MaxVio of the window's summed load
    moescope_routing_load_cv_ratio{run,layer}           coefficient of variation of load
    moescope_routing_dead_experts_ratio{run,layer}      dead experts / experts
    moescope_routing_entropy_mean_nats{run,layer}       mean per-token router entropy
    moescope_routing_drop_ratio{run,layer}              dropped slots / all slots
    moescope_routing_<same>_across_layers_<unit>{run,stat}   stat p50, p90 and max over layers
    moescope_routing_expert_load_share_ratio{run,layer,end,rank,expert}
                                                        the K most (end="top") and K least
                                                        (end="bottom") loaded experts of a layer
    moescope_routing_window_first_step{run}, moescope_routing_window_last_step{run}

Never one series per expert (nor per rank): the number of series does not grow with the
number of experts E. For R runs of L MoE layers each, K experts per end and A firing
(rule, run) pairs, the exposition holds at most

    series = 2 + A + R · (3 + 5·L + 5·3 + 2·K·L + 2)

(the runs gauge and the firing count, one series per firing pair; per run 3 ingest series,
5 per-layer metrics, 5 × 3 across-layer stats, 2·K experts per layer, 2 window bounds).
One 64-layer × 256-expert run with K = 3 and nothing firing: 2 + (3 + 320 + 15 + 384 + 2)
= 726 series, the same at 8 or 1024 experts. `series_bound` computes it.

Computing the routing series reads the store, so it is cached for `cache_s` seconds:
scrapes in between cost only the ingest and alert queries.
"""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pandas as pd
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from moescope.analysis import alerts, compute_metric
from moescope.collector.store import Store

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes
WINDOW_STEPS = 100   # steps in the latest window
TOP_K = 3            # experts per end (most and least loaded) per layer
CACHE_S = 5.0        # seconds a computed set of routing series is served again
QUANTILES = {"p50": 0.5, "p90": 0.9, "max": 1.0}  # across layers; a gauge may not carry `quantile`

# (column of the per-layer table, family name, help): one gauge per layer, and its quantiles across layers.
LAYER_FAMILIES = (
    ("maxvio", "moescope_routing_maxvio_ratio", "MaxVio (max load - mean load) / mean load over the latest window"),
    ("cv", "moescope_routing_load_cv_ratio", "Coefficient of variation of expert load over the latest window"),
    ("dead_fraction", "moescope_routing_dead_experts_ratio", "Fraction of experts with no assignment in the latest window"),
    ("entropy_mean", "moescope_routing_entropy_mean_nats", "Mean per-token router entropy (nats) over the latest window"),
    ("drop_rate", "moescope_routing_drop_ratio", "Dropped slots over all routed slots in the latest window"),
)
SHARE_FAMILY = "moescope_routing_expert_load_share_ratio"


def series_bound(runs: int, layers: int, top_k: int = TOP_K, firing: int = 0) -> int:
    """The most series the exposition holds for `runs` runs of `layers` MoE layers (see the module docstring)."""
    per_run = 3 + len(LAYER_FAMILIES) * layers + len(LAYER_FAMILIES) * len(QUANTILES) + 2 * top_k * layers + 2
    return 2 + firing + runs * per_run


@dataclass(frozen=True)
class RoutingSummary:
    """One run's latest window: per-layer metrics and the top/bottom experts by load share."""
    run: str
    first_step: int
    last_step: int
    layers: pd.DataFrame    # layer, maxvio, cv, dead_fraction, entropy_mean, drop_rate
    extremes: pd.DataFrame  # layer, end ("top"/"bottom"), rank (1..K), expert, share


def latest_window(store: Store, run: str, window_steps: int = WINDOW_STEPS) -> tuple[int, int] | None:
    """(max(last - W + 1, first), last) over the run's expert_step steps, or None when it has none."""
    if window_steps < 1:
        raise ValueError(f"window_steps must be at least 1, got {window_steps}")
    first, last = store.sql("SELECT min(step) AS first, max(step) AS last FROM expert_step WHERE run = ?",
                            [run], run=run).iloc[0]
    if last is None or pd.isna(last):
        return None
    return max(int(last) - window_steps + 1, int(first)), int(last)


def routing_summary(store: Store, run: str, *, window_steps: int = WINDOW_STEPS, top_k: int = TOP_K,
                    phase: str | None = None) -> RoutingSummary | None:
    """The routing health of `run` over its latest window, from the analysis library; None without rows."""
    with store.reading(run):  # every metric below shares one connection and one segment listing
        window = latest_window(store, run, window_steps)
        if window is None:
            return None
        kw = dict(by="window", steps=window, phase=phase)
        per_layer = compute_metric(store, "maxvio", run, **kw)[["layer", "maxvio_global"]].rename(columns={"maxvio_global": "maxvio"})
        for name, cols in (("cv", {"cv": "cv"}), ("dead_experts", {"dead_fraction": "dead_fraction"}),
                           ("entropy", {"mean": "entropy_mean"}), ("drop_rate", {"drop_rate": "drop_rate"})):
            df = compute_metric(store, name, run, **kw)[["layer", *cols]].rename(columns=cols)
            per_layer = per_layer.merge(df, on="layer", how="outer")
        share = compute_metric(store, "load_share", run, **kw)
    return RoutingSummary(run, window[0], window[1], per_layer.sort_values("layer").reset_index(drop=True),
                          _extremes(share, top_k))


def _extremes(share: pd.DataFrame, top_k: int) -> pd.DataFrame:
    """Per layer the top_k highest and lowest load shares (ties by expert id), ranked from 1."""
    parts = []
    for end, ascending in (("top", False), ("bottom", True)):
        ranked = share.sort_values(["layer", "share", "expert"], ascending=[True, ascending, True])
        picked = ranked.groupby("layer", sort=True).head(top_k).copy()
        picked["end"] = end
        picked["rank"] = picked.groupby("layer").cumcount() + 1
        parts.append(picked[["layer", "end", "rank", "expert", "share"]])
    return pd.concat(parts, ignore_index=True)


def firing_alerts(store: Store, limit: int = 10_000) -> list[dict]:
    """(rule, run) pairs whose newest event is `firing`, with the rule name attached."""
    names = {r["id"]: r["name"] for r in alerts.list_rules(store)}
    newest: dict[tuple[int, str], dict] = {}
    for event in alerts.list_events(store, limit=limit):  # newest first
        newest.setdefault((event["rule_id"], event["run"]), event)
    return [{**e, "rule": names.get(e["rule_id"], str(e["rule_id"]))} for e in newest.values() if e["state"] == "firing"]


def _finite(value) -> bool:
    return value is not None and not pd.isna(value) and not math.isinf(float(value))


class StoreCollector:
    """A prometheus_client collector over one store; routing series are recomputed at most every cache_s."""

    def __init__(self, store: Store, *, window_steps: int = WINDOW_STEPS, top_k: int = TOP_K, cache_s: float = CACHE_S,
                 phase: str | None = None):
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        self.store, self.window_steps, self.top_k, self.cache_s, self.phase = store, window_steps, top_k, cache_s, phase
        self._lock = threading.Lock()
        self._cached: tuple[float, list[Metric]] | None = None

    def collect(self) -> Iterator[Metric]:
        runs = self.store.runs()
        yield from self._ingest(runs)
        yield from self._alerts()
        yield from self._routing(list(runs.run))

    def _ingest(self, runs: pd.DataFrame) -> Iterable[Metric]:
        count = GaugeMetricFamily("moescope_runs", "Runs recorded in the store.", value=len(runs))
        frames = CounterMetricFamily("moescope_ingest_frames", "Frames stored, per run.", labels=["run"])
        rows = CounterMetricFamily("moescope_routing_rows", "Routing rows stored (live segments), per run.", labels=["run"])
        last = GaugeMetricFamily("moescope_last_write_timestamp_seconds", "Unix time of the newest stored frame, per run.",
                                 labels=["run"])
        for r in runs.itertuples():
            frames.add_metric([r.run], r.frames)
            rows.add_metric([r.run], r.routing_rows)
            if _finite(r.last_write):
                last.add_metric([r.run], float(r.last_write))
        return count, frames, rows, last

    def _alerts(self) -> Iterable[Metric]:
        firing = firing_alerts(self.store)
        per_pair = GaugeMetricFamily("moescope_alerts_firing", "Alert rules firing now (1 per rule and run).",
                                     labels=["rule", "run", "layer"])
        for e in firing:  # layer "" (the same as no label to Prometheus) for run-scoped rules
            layer = e.get("layer")
            per_pair.add_metric([e["rule"], e["run"], "" if layer is None else str(layer)], 1)
        total = GaugeMetricFamily("moescope_alerts_firing_pairs", "Number of (rule, run) pairs firing now.",
                                  value=len(firing))
        return per_pair, total

    def _routing(self, runs: list[str]) -> list[Metric]:
        with self._lock:  # concurrent scrapes compute once
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] >= self.cache_s:
                self._cached = (now, self._routing_families(runs))
            return self._cached[1]

    def _routing_families(self, runs: list[str]) -> list[Metric]:
        per_layer = {col: GaugeMetricFamily(name, help_text + ", per layer.", labels=["run", "layer"])
                     for col, name, help_text in LAYER_FAMILIES}
        unit = {col: name.rsplit("_", 1) for col, name, _ in LAYER_FAMILIES}
        across = {col: GaugeMetricFamily(f"{unit[col][0]}_across_layers_{unit[col][1]}",
                                         help_text + ": p50, p90 and max across layers.", labels=["run", "stat"])
                  for col, name, help_text in LAYER_FAMILIES}
        share = GaugeMetricFamily(SHARE_FAMILY, "Load share of the most (end=top) and least (end=bottom) loaded experts "
                                  "of each layer over the latest window, rank 1 the most extreme.",
                                  labels=["run", "layer", "end", "rank", "expert"])
        first = GaugeMetricFamily("moescope_routing_window_first_step", "First step of the latest window.", labels=["run"])
        last = GaugeMetricFamily("moescope_routing_window_last_step", "Last step of the latest window.", labels=["run"])
        for run in runs:
            summary = routing_summary(self.store, run, window_steps=self.window_steps, top_k=self.top_k, phase=self.phase)
            if summary is None:
                continue
            first.add_metric([run], summary.first_step)
            last.add_metric([run], summary.last_step)
            for col, *_ in LAYER_FAMILIES:
                values = summary.layers[["layer", col]].dropna()
                for layer, value in values.itertuples(index=False):
                    per_layer[col].add_metric([run, str(int(layer))], float(value))
                if len(values):
                    for stat, q in QUANTILES.items():
                        across[col].add_metric([run, stat], float(values[col].quantile(q)))
            for row in summary.extremes.itertuples(index=False):
                share.add_metric([run, str(int(row.layer)), row.end, str(int(row.rank)), str(int(row.expert))],
                                 float(row.share))
        return [*per_layer.values(), *across.values(), share, first, last]


def registry_for(store: Store, **options) -> CollectorRegistry:
    """A registry of its own for one app (no process-global state): the store's collector only."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store, **options))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The /metrics page in the text format 0.0.4."""
    return generate_latest(registry)
