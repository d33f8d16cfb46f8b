"""Alert rules over routing metrics (METRICS.md "Alerts"), with hysteresis and webhooks.

A rule = metric, scope (a whole run, one layer, or one expert), comparison, threshold,
window (the last N steps), and for_evaluations: how many consecutive evaluations the
condition must hold before the rule fires. A firing rule resolves at the first
evaluation where the condition no longer holds. Rules and events live in the metadata
tables alert_rules / alert_events (through the store's SQLAlchemy engine); the count of
consecutive breaches is kept as a "pending" event row, so evaluation may run in any
process (a Celery beat task, the CLI) and carry on where the last one stopped.
"""
from __future__ import annotations

import logging
import math
import operator
import re
import time
from collections.abc import Callable
from typing import Any

import httpx
from sqlalchemy import and_, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from moescope.analysis import compute_metric
from moescope.collector import metadata as md
from moescope.schema import SchemaError, check_run_id

log = logging.getLogger(__name__)

ALERT_METRICS = ("maxvio", "dead_experts", "drop_rate", "entropy", "cv")
# The per-layer column a rule compares, in each metric's by="window" result.
_WINDOW_COLUMN = {"maxvio": "maxvio_global", "dead_experts": "dead", "drop_rate": "drop_rate", "entropy": "mean",
                  "cv": "cv"}
EXPERT_METRICS = ("maxvio", "dead_experts", "drop_rate")  # the ones defined for a single expert
COMPARISONS: dict[str, Callable[[float, float], bool]] = {">": operator.gt, ">=": operator.ge, "<": operator.lt,
                                                          "<=": operator.le}
# Delivery counters for this process: notifications never stop an evaluation.
NOTIFY_STATS = {"sent": 0, "failed": 0}
_URL = re.compile(r"^https?://[^\s/]+")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def add_rule(store, name: str, metric: str, comparison: str, threshold: float, *, run: str | None = None,
             layer: int | None = None, expert: int | None = None, window_steps: int = 50, for_evaluations: int = 1,
             webhook: str | None = None, enabled: bool = True) -> dict:
    """Create a rule; ValueError with one line naming the bad input. Scope: expert if given, else layer, else run."""
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise ValueError(f"rule name must be a non-empty string of at most 200 characters, got {name!r}")
    if metric not in ALERT_METRICS:
        raise ValueError(f"unknown alert metric {metric!r}; choose one of {', '.join(ALERT_METRICS)}")
    if comparison not in COMPARISONS:
        raise ValueError(f"unknown comparison {comparison!r}; choose one of {' '.join(COMPARISONS)}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    if run is not None:
        try:
            check_run_id(run)
        except SchemaError as exc:
            raise ValueError(str(exc)) from None
    for label, v in (("layer", layer), ("expert", expert)):
        if v is not None and (not _is_int(v) or v < 0):
            raise ValueError(f"{label} must be a non-negative int or None, got {v!r}")
    if expert is not None and metric not in EXPERT_METRICS:
        raise ValueError(f"metric {metric!r} has no per-expert value; expert scope takes {', '.join(EXPERT_METRICS)}")
    if not _is_int(window_steps) or window_steps < 1:
        raise ValueError(f"window_steps must be a positive int, got {window_steps!r}")
    if not _is_int(for_evaluations) or for_evaluations < 1:
        raise ValueError(f"for_evaluations must be a positive int, got {for_evaluations!r}")
    if webhook is not None and (not isinstance(webhook, str) or not _URL.match(webhook)):
        raise ValueError(f"webhook must be an http(s) URL, got {webhook!r}")
    values = dict(name=name.strip(), metric=metric, run=run, layer=layer, expert=expert, comparison=comparison,
                  threshold=float(threshold), window_steps=window_steps, for_evaluations=for_evaluations,
                  webhook=webhook, enabled=bool(enabled), created_at=time.time())
    try:
        with store.engine.begin() as conn:
            rule_id = conn.execute(insert(md.alert_rules).values(**values)).inserted_primary_key[0]
    except IntegrityError:
        raise ValueError(f"an alert rule named {name.strip()!r} already exists") from None
    return {"id": int(rule_id), **values, "scope": _scope(values)}


def _scope(rule: dict) -> str:
    return "expert" if rule.get("expert") is not None else "layer" if rule.get("layer") is not None else "run"


def list_rules(store, *, enabled_only: bool = False) -> list[dict]:
    q = select(md.alert_rules).order_by(md.alert_rules.c.id)
    if enabled_only:
        q = q.where(md.alert_rules.c.enabled.is_(True))
    with store.engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(q)]
    return [{**r, "scope": _scope(r)} for r in rows]


def delete_rule(store, rule: int | str) -> bool:
    """Delete a rule (by id or name) and its events; False when there was none."""
    col = md.alert_rules.c.id if _is_int(rule) else md.alert_rules.c.name
    with store.engine.begin() as conn:
        found = conn.execute(select(md.alert_rules.c.id).where(col == rule)).first()
        if found is None:
            return False
        conn.execute(delete(md.alert_events).where(md.alert_events.c.rule_id == found[0]))
        conn.execute(delete(md.alert_rules).where(md.alert_rules.c.id == found[0]))
    return True


def list_events(store, *, rule_id: int | None = None, run: str | None = None, limit: int = 200) -> list[dict]:
    """Stored firing / resolved events, newest first."""
    q = select(md.alert_events).where(md.alert_events.c.state.in_(("firing", "resolved")))
    if rule_id is not None:
        q = q.where(md.alert_events.c.rule_id == rule_id)
    if run is not None:
        q = q.where(md.alert_events.c.run == run)
    with store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(q.order_by(md.alert_events.c.id.desc()).limit(limit))]


# ------------------------------------------------------------------ observing a rule
def observe(store, rule: dict, run: str) -> tuple[float, int, dict] | None:
    """The rule's value over its window, the window's last step, and per-layer evidence; None without data."""
    table = "token_stats" if rule["metric"] == "entropy" else "expert_step"
    last = store.sql(f"SELECT max(step) AS s FROM {table}", run=run)["s"].iloc[0]
    if last is None or (isinstance(last, float) and math.isnan(last)):
        return None
    last = int(last)
    steps = (last - int(rule["window_steps"]) + 1, last)
    kw = {"steps": steps, "by": "window"}
    metric, layer, expert = rule["metric"], rule["layer"], rule["expert"]
    if expert is not None:
        per_layer = _expert_values(store, metric, run, expert, steps, layer)
    else:
        df = compute_metric(store, metric, run, **kw)
        per_layer = dict(zip(df.layer, df[_WINDOW_COLUMN[metric]]))
    per_layer = {int(k): float(v) for k, v in per_layer.items() if v is not None and not math.isnan(float(v))}
    if layer is not None:
        if layer not in per_layer:
            return None
        value = per_layer[layer]
    elif not per_layer:
        return None
    elif metric == "dead_experts":
        value = float(sum(per_layer.values()))  # dead experts anywhere in the model
    else:
        value = float(sum(per_layer.values()) / len(per_layer))  # averaged over layers, as MaxVio is reported
    return value, last, {"per_layer": {str(k): v for k, v in sorted(per_layer.items())}, "steps": list(steps)}


def _expert_values(store, metric: str, run: str, expert: int, steps: tuple[int, int], layer: int | None) -> dict:
    layers = None if layer is None else [layer]
    if metric == "drop_rate":
        df = store.sql("SELECT layer, sum(dropped) / nullif(sum(tokens), 0) AS v FROM expert_step "
                       "WHERE expert = ? AND step BETWEEN ? AND ? GROUP BY layer", [expert, *steps], run=run)
        df = df[df.layer.isin(layers)] if layers else df
        return dict(zip(df.layer, df.v))
    df = compute_metric(store, "load_share", run, layers=layers, steps=steps, by="window")
    df = df[df.expert == expert]
    if metric == "dead_experts":
        return dict(zip(df.layer, (df.load == 0).astype(float)))
    # This expert's violation: (load_i − mean load) / mean load = share·E − 1.
    return dict(zip(df.layer, df.share / df.uniform - 1.0))


# ------------------------------------------------------------------ evaluating
def evaluate_alerts(store, now: float | None = None, notify: Callable[[dict], Any] | None = None) -> list[dict]:
    """Evaluate every enabled rule on every run it covers; returns the new firing / resolved events.

    Each new event is posted to the rule's webhook (if any) and passed to `notify`;
    delivery failures are counted in NOTIFY_STATS and logged, never raised.
    """
    now = time.time() if now is None else float(now)
    known = list(store.runs().run)
    new_events = []
    for rule in list_rules(store, enabled_only=True):
        for run in ([rule["run"]] if rule["run"] is not None else known):
            if run not in known:
                continue
            try:
                obs = observe(store, rule, run)
            except Exception as exc:  # one broken rule must not stop the others
                log.warning("alert rule %r on run %r could not be evaluated: %s", rule["name"], run, exc)
                continue
            if obs is None:
                continue
            event = _transition(store, rule, run, *obs, now=now)
            if event is not None:
                new_events.append(event)
    for event in new_events:
        _deliver(store, event, notify)
    return new_events


def _transition(store, rule: dict, run: str, value: float, step: int, evidence: dict, *, now: float) -> dict | None:
    ev = md.alert_events.c
    key = and_(ev.rule_id == rule["id"], ev.run == run)
    holds = COMPARISONS[rule["comparison"]](value, rule["threshold"])
    with store.engine.begin() as conn:
        last = conn.execute(select(ev.state).where(key, ev.state.in_(("firing", "resolved"))).order_by(ev.id.desc())
                            .limit(1)).first()
        firing = last is not None and last[0] == "firing"
        pending = conn.execute(select(ev.id, ev.evidence).where(key, ev.state == "pending")).first()
        if not holds:
            if pending is not None:
                conn.execute(delete(md.alert_events).where(ev.id == pending[0]))
            state = "resolved" if firing else None
        elif firing:
            state = None
        else:
            count = int((pending[1] or {}).get("consecutive", 0)) + 1 if pending is not None else 1
            if count < int(rule["for_evaluations"]):
                pend = {"consecutive": count, "value": value, "step": step}
                if pending is None:
                    conn.execute(insert(md.alert_events).values(rule_id=rule["id"], run=run, layer=rule["layer"],
                                                                state="pending", value=value, step=step, evidence=pend,
                                                                created_at=now))
                else:
                    conn.execute(update(md.alert_events).where(ev.id == pending[0]).values(value=value, step=step,
                                                                                            evidence=pend))
                state = None
            else:
                if pending is not None:
                    conn.execute(delete(md.alert_events).where(ev.id == pending[0]))
                state = "firing"
        if state is None:
            return None
        evidence = {**evidence, "threshold": rule["threshold"], "comparison": rule["comparison"]}
        event_id = conn.execute(insert(md.alert_events).values(
            rule_id=rule["id"], run=run, layer=rule["layer"], state=state, value=value, step=step, evidence=evidence,
            notified=False, created_at=now)).inserted_primary_key[0]
    return {"id": int(event_id), "rule_id": rule["id"], "rule": rule["name"], "metric": rule["metric"],
            "scope": _scope(rule), "run": run, "layer": rule["layer"], "expert": rule["expert"], "state": state,
            "value": value, "step": step, "threshold": rule["threshold"], "comparison": rule["comparison"],
            "evidence": evidence, "created_at": now, "webhook": rule["webhook"]}


def payload(event: dict) -> dict:
    """The JSON body sent to webhooks."""
    return {k: event[k] for k in ("id", "rule", "rule_id", "metric", "scope", "run", "layer", "expert", "state",
                                  "value", "threshold", "comparison", "step", "evidence", "created_at")}


def post_webhook(url: str, body: dict, *, timeout: float = 5.0) -> bool:
    """POST body as JSON; True on a 2xx answer. Failures are counted and logged, never raised."""
    try:
        resp = httpx.post(url, json=body, timeout=timeout)
        ok = 200 <= resp.status_code < 300
        if not ok:
            log.warning("webhook %s answered %s", url, resp.status_code)
    except (httpx.HTTPError, OSError, ValueError) as exc:
        log.warning("webhook %s failed: %s", url, exc)
        ok = False
    NOTIFY_STATS["sent" if ok else "failed"] += 1
    return ok


def _deliver(store, event: dict, notify: Callable[[dict], Any] | None) -> None:
    body = payload(event)
    delivered = False
    if event.get("webhook"):
        delivered = post_webhook(event["webhook"], body)
    if notify is not None:
        try:
            notify(body)
            delivered = True
        except Exception as exc:  # a user callback must not break evaluation
            NOTIFY_STATS["failed"] += 1
            log.warning("alert notify callback failed: %s", exc)
    event["notified"] = delivered
    if delivered:
        with store.engine.begin() as conn:
            conn.execute(update(md.alert_events).where(md.alert_events.c.id == event["id"]).values(notified=True))
