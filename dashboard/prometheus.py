"""Prometheus text exposition (format 0.0.4), written by hand: a few gauges need no client library."""
from __future__ import annotations

import math
from collections.abc import Iterable

from moescope.analysis import alerts
from moescope.collector.store import Store

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _family(name: str, kind: str, help_text: str, samples: Iterable[tuple[dict[str, object], float]]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        body = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items() if v is not None)
        lines.append(f"{name}{{{body}}} {_number(value)}" if body else f"{name} {_number(value)}")
    return lines


def _number(value: float) -> str:
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(int(value)) if value.is_integer() else repr(value)


def firing_alerts(store: Store, limit: int = 10_000) -> list[dict]:
    """(rule, run) pairs whose newest event is `firing`, with the rule name attached."""
    names = {r["id"]: r["name"] for r in alerts.list_rules(store)}
    newest: dict[tuple[int, str], dict] = {}
    for event in alerts.list_events(store, limit=limit):  # newest first
        newest.setdefault((event["rule_id"], event["run"]), event)
    return [{**e, "rule": names.get(e["rule_id"], str(e["rule_id"]))} for e in newest.values() if e["state"] == "firing"]


def exposition(store: Store) -> str:
    """The /metrics page: per-run ingest counters and the alerts firing now."""
    runs = store.runs()
    firing = firing_alerts(store)
    lines = []
    lines += _family("moescope_runs", "gauge", "Runs recorded in the store.", [({}, len(runs))])
    lines += _family("moescope_ingest_frames_total", "counter", "Frames stored, per run.",
                     [({"run": r.run}, r.frames) for r in runs.itertuples()])
    lines += _family("moescope_routing_rows_total", "counter", "Routing rows stored (live segments), per run.",
                     [({"run": r.run}, r.routing_rows) for r in runs.itertuples()])
    lines += _family("moescope_last_write_timestamp_seconds", "gauge", "Unix time of the newest stored frame, per run.",
                     [({"run": r.run}, r.last_write) for r in runs.itertuples() if r.last_write is not None
                      and not (isinstance(r.last_write, float) and math.isnan(r.last_write))])
    lines += _family("moescope_alerts_firing", "gauge", "Alert rules firing now (1 per rule and run).",
                     [({"rule": e["rule"], "run": e["run"], "layer": e.get("layer")}, 1) for e in firing])
    lines += _family("moescope_alerts_firing_total", "gauge", "Number of (rule, run) pairs firing now.", [({}, len(firing))])
    return "\n".join(lines) + "\n"
