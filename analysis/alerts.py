"""Alert rules over routing metrics (METRICS.md "Alerts"): one series per rule, hysteresis, webhooks.

A rule = metric, scope (every run or one; all layers, one layer or one expert), comparison,
threshold, aggregation and for_evaluations. The aggregation names the series the rule
watches, one value per recorded step s:

  "step"    the metric over step s alone;
  "window"  the metric over the steps s-N+1 .. s pooled (N = window_steps), as compute_metric(by="window");
  "ema"     the exponential moving average of the per-step value, v_s = α·x_s + (1-α)·v_prev
            (α = ema_alpha, or 2/(span+1) from ema_span), starting at the run's first step.

`rule_series` returns that series with the threshold, so a chart of it is exactly what
the rule sees. A rule fires when the condition holds at `for_evaluations` consecutive
steps and resolves at the first step where it does not. Live evaluation
(`evaluate_alerts`) walks each run's new steps in order from where the previous one
stopped (the state is kept in the store, so beat and the CLI may take turns), and
`replay` walks the recorded history the same way: both give the same events. When a
rule first meets a run, live evaluation starts at that run's latest step.

Webhooks receive each event as JSON. A delivery that fails is retried at later
evaluations, up to DELIVERY_ATTEMPTS tries counted on the event; one failing webhook
never stops the others. URLs are checked with a real parser at creation and again
before each delivery (http/https, a host, no credentials, no control characters, and
the host in the `webhook_allowed_hosts` setting when that is set).
"""
from __future__ import annotations

import fnmatch
import logging
import math
import operator
import re
import time
import unicodedata
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pandas as pd

from moescope.analysis import compute_metric
from moescope.analysis.query import expert_load_sql, layer_meta, make_scope
from moescope.schema import SchemaError, check_run_id

log = logging.getLogger(__name__)

ALERT_METRICS = ("maxvio", "dead_experts", "drop_rate", "entropy", "cv")
EXPERT_METRICS = ("maxvio", "dead_experts", "drop_rate")  # the ones defined for a single expert
AGGREGATIONS = ("step", "window", "ema")
COMPARISONS: dict[str, Callable[[float, float], bool]] = {">": operator.gt, ">=": operator.ge, "<": operator.lt,
                                                          "<=": operator.le}
DELIVERY_ATTEMPTS = 5
# Ids, layers, experts and counts are stored as 32-bit INTEGER (PostgreSQL): larger ones are refused.
INT32_MAX = 2**31 - 1
_LAST_STEP = 2**62  # an open upper end for step ranges
# Delivery counters for this process: notifications never stop an evaluation.
NOTIFY_STATS = {"sent": 0, "failed": 0}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_count(label: str, v, lo: int) -> None:
    if not _is_int(v) or not lo <= v <= INT32_MAX:
        kind = "positive" if lo == 1 else "non-negative"
        raise ValueError(f"{label} must be a {kind} int (at most {INT32_MAX}), got {v!r}")


# ------------------------------------------------------------------ webhooks
def check_webhook(url, allowed_hosts: Iterable[str] = ()) -> str:
    """The URL if alerts may post to it; ValueError with one line saying why not."""
    if not isinstance(url, str) or not url or len(url) > 2000:
        raise ValueError("webhook must be an http(s) URL string of at most 2000 characters")
    odd = next((c for c in url if c.isspace() or unicodedata.category(c).startswith("C")), None)
    if odd is not None:
        raise ValueError(f"webhook URL holds a space or control character {odd!r}")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ValueError(f"webhook URL is invalid: {exc}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(f"webhook must be an http(s) URL, got scheme {parts.scheme!r}")
    if "@" in parts.netloc:
        # Refused rather than stored: the URL is shown to token holders and logged (masked),
        # and basic-auth credentials would go to whichever host the URL names.
        raise ValueError("webhook URL must not carry credentials (user:password@host); put the secret in the path")
    if not parts.hostname:
        raise ValueError("webhook URL has no host")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number in 0..65535
        httpx.URL(url)
    except (ValueError, httpx.InvalidURL) as exc:
        raise ValueError(f"webhook URL has an invalid host or port: {exc}") from None
    patterns = list(allowed_hosts or ())
    host = parts.hostname.lower()
    if patterns and not any(fnmatch.fnmatchcase(host, p.lower()) for p in patterns):
        raise ValueError(f"webhook host {host!r} is not in webhook_allowed_hosts ({', '.join(patterns)})")
    return url


def mask_webhook(url: str | None) -> str | None:
    """scheme://host[:port]/*** — what readers without the token (and logs) see of a webhook URL."""
    if url is None:
        return None
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        return "***"
    return f"{parts.scheme}://{host}{port}/***" if parts.scheme and host else "***"


def _allowed_hosts(settings) -> list[str]:
    if settings is None:
        from moescope.settings import get_settings

        settings = get_settings()
    return list(settings.webhook_allowed_hosts)


# ------------------------------------------------------------------ rules
def add_rule(store, name: str, metric: str, comparison: str, threshold: float, *, run: str | None = None,
             layer: int | None = None, expert: int | None = None, aggregation: str = "window",
             window_steps: int | None = None, ema_alpha: float | None = None, ema_span: float | None = None,
             for_evaluations: int = 1, webhook: str | None = None, enabled: bool = True, settings=None) -> dict:
    """Create a rule; ValueError with one line naming the bad input.

    Scope: expert if given, else layer, else the whole run (averaged over layers; summed
    for dead_experts). A run, if given, must be recorded, and the layer and expert must
    exist in it. Rule names may not be all digits: numbers address rules by id.
    """
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise ValueError(f"rule name must be a non-empty string of at most 200 characters, got {name!r}")
    name = name.strip()
    if _odd_name(name):
        raise ValueError(f"rule name must not hold control characters, got {name!r}")
    if name.isnumeric():
        raise ValueError(f"rule name must not be all digits (numbers address rules by id), got {name!r}")
    if metric not in ALERT_METRICS:
        raise ValueError(f"unknown alert metric {metric!r}; choose one of {', '.join(ALERT_METRICS)}")
    if comparison not in COMPARISONS:
        raise ValueError(f"unknown comparison {comparison!r}; choose one of {' '.join(COMPARISONS)}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    for label, v in (("layer", layer), ("expert", expert)):
        if v is not None:
            _check_count(label, v, 0)
    if expert is not None and metric not in EXPERT_METRICS:
        raise ValueError(f"metric {metric!r} has no per-expert value; expert scope takes {', '.join(EXPERT_METRICS)}")
    window_steps, alpha = _check_aggregation(aggregation, window_steps, ema_alpha, ema_span)
    _check_count("for_evaluations", for_evaluations, 1)
    if webhook is not None:
        check_webhook(webhook, _allowed_hosts(settings))
    if run is not None:
        try:
            check_run_id(run)
        except SchemaError as exc:
            raise ValueError(str(exc)) from None
        _check_scope_exists(store, run, layer, expert)
    values = dict(name=name, metric=metric, run=run, layer=layer, expert=expert, comparison=comparison,
                  threshold=float(threshold), aggregation=aggregation, window_steps=window_steps, ema_alpha=alpha,
                  for_evaluations=for_evaluations, webhook=webhook, enabled=bool(enabled), created_at=time.time())
    rule_id = store.insert_alert_rule(values)
    return _public({"id": rule_id, **values})


def _odd_name(name: str) -> bool:
    return len(name) > 200 or any(unicodedata.category(c).startswith("C") for c in name)


def _check_aggregation(aggregation, window_steps, ema_alpha, ema_span) -> tuple[int, float | None]:
    """(window_steps, alpha) to store for a valid aggregation."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
    if aggregation != "ema" and (ema_alpha is not None or ema_span is not None):
        raise ValueError(f"ema_alpha / ema_span apply to aggregation 'ema' only, not {aggregation!r}")
    if aggregation != "window" and window_steps is not None:
        raise ValueError(f"window_steps applies to aggregation 'window' only, not {aggregation!r}")
    if aggregation == "window":
        window_steps = 50 if window_steps is None else window_steps
        _check_count("window_steps", window_steps, 1)
        return window_steps, None
    if aggregation == "step":
        return 1, None
    if (ema_alpha is None) == (ema_span is None):
        raise ValueError("aggregation 'ema' needs exactly one of ema_alpha (0 < alpha <= 1) or ema_span (>= 1)")
    for label, v in (("ema_alpha", ema_alpha), ("ema_span", ema_span)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise ValueError(f"{label} must be a finite number, got {v!r}")
    if ema_alpha is not None and not 0 < ema_alpha <= 1:
        raise ValueError(f"ema_alpha must be in (0, 1], got {ema_alpha!r}")
    if ema_span is not None and ema_span < 1:
        raise ValueError(f"ema_span must be at least 1, got {ema_span!r}")
    return 1, float(ema_alpha) if ema_alpha is not None else 2.0 / (float(ema_span) + 1.0)


def _check_scope_exists(store, run: str, layer: int | None, expert: int | None) -> None:
    store.require_run(run)  # UnknownRun (a ValueError) naming the runs that exist
    meta = layer_meta(store, run)
    sizes = dict(zip(meta.layer, meta.E))
    if layer is not None and layer not in sizes:
        known = ", ".join(str(x) for x in sizes) or "none recorded yet"
        raise ValueError(f"layer {layer} is not a layer of run {run!r} (layers: {known})")
    if expert is not None:
        experts = sizes[layer] if layer is not None else max(sizes.values(), default=0)
        if expert >= experts:
            where = f"layer {layer}" if layer is not None else "any layer"
            raise ValueError(f"expert {expert} does not exist in {where} of run {run!r} ({experts} experts)")


def _public(rule: dict) -> dict:
    """A stored rule as callers see it: scope named, aggregation spelled out (rules from before it: window)."""
    rule = dict(rule)
    rule["aggregation"] = rule.get("aggregation") or "window"
    rule["scope"] = "expert" if rule.get("expert") is not None else "layer" if rule.get("layer") is not None else "run"
    return rule


def list_rules(store, *, enabled_only: bool = False) -> list[dict]:
    return [_public(r) for r in store.alert_rules(enabled_only=enabled_only)]


def rule_key(text: str) -> int | str:
    """A rule reference as typed in a URL or on the command line: ASCII digits are an id, anything else a name."""
    if re.fullmatch(r"[0-9]+", text):
        if len(text) > 10 or int(text) > INT32_MAX:
            raise ValueError(f"rule id {text} is out of range (ids are at most {INT32_MAX})")
        return int(text)
    return text


def get_rule(store, rule: int | str | dict) -> dict | None:
    """A rule by id (int) or name (str); a dict is taken as the rule itself."""
    if isinstance(rule, dict):
        return _public(rule)
    if not _is_int(rule) and (not isinstance(rule, str) or _odd_name(rule)):
        return None  # no stored rule can have it (and PostgreSQL refuses NUL in a query)
    found = store.alert_rule(rule_id=rule) if _is_int(rule) else store.alert_rule(name=rule)
    return None if found is None else _public(found)


def delete_rule(store, rule: int | str) -> bool:
    """Delete a rule (by id or name) with its events; False when there was none."""
    found = get_rule(store, rule)
    return found is not None and store.delete_alert_rule(found["id"])


def list_events(store, *, rule_id: int | None = None, run: str | None = None, limit: int = 200) -> list[dict]:
    """Stored firing / resolved events, newest first."""
    return store.alert_events(rule_id=rule_id, run=run, limit=limit)


# ------------------------------------------------------------------ the series a rule watches
def _require_rule(store, rule) -> dict:
    found = get_rule(store, rule)
    if found is None:
        raise ValueError(f"no alert rule {rule!r}")
    return found


def _require_run(store, run: str) -> None:
    try:
        check_run_id(run)
    except SchemaError as exc:
        raise ValueError(str(exc)) from None
    store.require_run(run)


def rule_series(store, rule: int | str | dict, run: str, steps: tuple[int, int] | None = None) -> pd.DataFrame:
    """The series `rule` evaluates on `run`: columns step, value, threshold, holds (the condition at that step).

    One row per recorded step with data for the rule's scope (inclusive `steps` range if
    given); value is the metric under the rule's aggregation, exactly what evaluation
    compares with the threshold. Plot `value` and `threshold` to show what the rule sees.
    """
    rule = _require_rule(store, rule)
    _require_run(store, run)
    if steps is not None:
        steps = make_scope(run, steps=steps).steps
    since = steps[0] if steps is not None and rule["aggregation"] != "ema" else None
    rows, _ = _series_rows(store, rule, run, since=since)
    if steps is not None:
        rows = [r for r in rows if steps[0] <= r[0] <= steps[1]]
    cmp = COMPARISONS[rule["comparison"]]
    return pd.DataFrame({"step": [r[0] for r in rows], "value": [r[1] for r in rows],
                         "threshold": [float(rule["threshold"])] * len(rows),
                         "holds": [bool(cmp(r[1], rule["threshold"])) for r in rows]},
                        columns=["step", "value", "threshold", "holds"]).astype({"step": "int64", "value": "float64"})


def _series_rows(store, rule: dict, run: str, *, since: int | None = None,
                 ema: float | None = None) -> tuple[list[tuple[int, float, dict]], float | None]:
    """(step, value, evidence) for each step >= since with a finite value, and the moving average at the end.

    For "ema", `ema` carries the average up to the step before `since` (None: start afresh).
    """
    agg = rule["aggregation"]
    n = int(rule["window_steps"]) if agg == "window" else 1
    lo = None if since is None else since - n + 1
    per_layer = _per_layer_values(store, rule, run, n, None if lo is None else (lo, _LAST_STEP))
    steps = sorted({s for values in per_layer.values() for s in values})
    rows = []
    for s in steps:
        if since is not None and s < since:
            continue
        layers = {layer: v[s] for layer, v in sorted(per_layer.items()) if s in v and math.isfinite(v[s])}
        if not layers:
            continue
        value = sum(layers.values()) if rule["metric"] == "dead_experts" else sum(layers.values()) / len(layers)
        evidence = {"per_layer": {str(k): float(v) for k, v in layers.items()}, "aggregation": agg}
        if agg == "window":
            evidence["steps"] = [s - n + 1, s]
        if agg == "ema":
            ema = value if ema is None else rule["ema_alpha"] * value + (1.0 - rule["ema_alpha"]) * ema
            evidence.update(step_value=float(value), ema_alpha=rule["ema_alpha"])
            value = ema
        rows.append((int(s), float(value), evidence))
    return rows, ema


def _per_layer_values(store, rule: dict, run: str, n: int, steps: tuple[int, int] | None) -> dict[int, dict[int, float]]:
    """{layer: {step: the metric over steps s-n+1 .. s}} for the rule's layer (or all) and expert (or none)."""
    layers = None if rule["layer"] is None else [int(rule["layer"])]
    scope = make_scope(run, layers=layers, steps=steps, by="step")
    metric, expert = rule["metric"], rule["expert"]
    out: dict[int, dict[int, float]] = {}
    if metric == "entropy":
        df = compute_metric(store, "entropy", run, layers=layers, steps=steps, by="step", quantiles=False)
        for layer, g in df.groupby("layer"):
            steps_S = g.step.to_numpy()
            tokens_S, sums_S = _window_sums([g.tokens.to_numpy(float), (g.tokens * g["mean"]).to_numpy(float)], steps_S, n)
            with np.errstate(invalid="ignore", divide="ignore"):
                out[int(layer)] = dict(zip(steps_S.tolist(), (sums_S / tokens_S).tolist()))
        return out
    cte, params = expert_load_sql(scope, layer_meta(store, run))
    df = store.sql(cte + " SELECT step, layer, expert, load, dropped FROM load ORDER BY step, layer, expert",
                   params, run=run)
    for layer, g in df.groupby("layer"):
        load_SE = g.pivot(index="step", columns="expert", values="load")
        steps_S = load_SE.index.to_numpy()
        drop_SE = g.pivot(index="step", columns="expert", values="dropped").to_numpy(float)
        load_SE, drop_SE = _window_sums([load_SE.to_numpy(float), drop_SE], steps_S, n)
        out[int(layer)] = dict(zip(steps_S.tolist(), _load_metric(metric, load_SE, drop_SE, expert).tolist()))
    return out


def _window_sums(arrays: list[np.ndarray], steps_S: np.ndarray, n: int) -> list[np.ndarray]:
    """Each array summed over the rows whose step lies in s-n+1 .. s, for each row's step s."""
    if n == 1:
        return arrays
    lo_S = np.searchsorted(steps_S, steps_S - n + 1, side="left")
    # Summed slice by slice (not as cumsum differences), so a value never depends on where the query began.
    return [np.stack([a[lo:i + 1].sum(axis=0) for i, lo in enumerate(lo_S)]) for a in arrays]


def _load_metric(metric: str, load_SE: np.ndarray, drop_SE: np.ndarray, expert: int | None) -> np.ndarray:
    """The METRICS.md balance metric per row from pooled per-expert loads (as analysis.balance computes it)."""
    mean_S = load_SE.mean(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        if expert is not None:
            if expert >= load_SE.shape[1]:
                return np.full(len(load_SE), np.nan)
            load_S, drop_S = load_SE[:, expert], drop_SE[:, expert]
            if metric == "maxvio":  # this expert's violation: (load_i − mean load) / mean load
                return np.where(mean_S > 0, load_S / mean_S - 1.0, np.nan)
            if metric == "dead_experts":
                return (load_S == 0).astype(float)
            return np.where(load_S > 0, drop_S / load_S, np.nan)
        if metric == "maxvio":
            return np.where(mean_S > 0, (load_SE.max(axis=1) - mean_S) / mean_S, np.nan)
        if metric == "cv":
            return np.where(mean_S > 0, load_SE.std(axis=1) / mean_S, np.nan)
        if metric == "dead_experts":
            return (load_SE == 0).sum(axis=1).astype(float)
        total_S = load_SE.sum(axis=1)
        return np.where(total_S > 0, drop_SE.sum(axis=1) / total_S, np.nan)


# ------------------------------------------------------------------ firing and resolving
def _fresh_state() -> dict:
    return {"last_step": None, "streak": 0, "firing": False, "ema": None}


def _advance(state: dict, rows: list[tuple[int, float, dict]], rule: dict) -> tuple[dict, list[tuple]]:
    """Walk rows in step order from `state`; returns the new state and the (state, step, value, evidence) transitions."""
    state = dict(state)
    cmp, threshold, need = COMPARISONS[rule["comparison"]], float(rule["threshold"]), int(rule["for_evaluations"])
    out = []
    for step, value, evidence in rows:
        if state["last_step"] is not None and step <= state["last_step"]:
            continue
        state["last_step"] = step
        if cmp(value, threshold):
            state["streak"] = min(state["streak"] + 1, need)
            if not state["firing"] and state["streak"] >= need:
                state["firing"] = True
                out.append(("firing", step, value, evidence))
        else:
            state["streak"] = 0
            if state["firing"]:
                state["firing"] = False
                out.append(("resolved", step, value, evidence))
    return state, out


def replay(store, rule: int | str | dict, run: str) -> list[dict]:
    """When `rule` would have fired and resolved over the recorded history of `run` (one evaluation per step)."""
    rule = _require_rule(store, rule)
    _require_run(store, run)
    rows, _ = _series_rows(store, rule, run)
    _, transitions = _advance(_fresh_state(), rows, rule)
    return [{"state": st, "step": step, "value": value, "threshold": float(rule["threshold"])}
            for st, step, value, _ in transitions]


def _latest_step(store, rule: dict, run: str) -> int | None:
    # Entropy: the token_step rollup (small) first; runs stored before rollups have only token_stats.
    tables = ("token_step", "token_stats") if rule["metric"] == "entropy" else ("expert_step",)
    where = "" if rule["layer"] is None else f" WHERE layer = {int(rule['layer'])}"
    for table in tables:
        last = store.sql(f"SELECT max(step) AS s FROM {table}{where}", run=run)["s"].iloc[0]
        if last is not None and not pd.isna(last):
            return int(last)
    return None


def _evaluate(store, rule: dict, run: str, now: float) -> list[dict]:
    state = store.alert_state(rule["id"], run)
    if state is None or state["last_step"] is None:
        latest = _latest_step(store, rule, run)
        if latest is None:
            return []
        # First sight of this run: start at its latest step (the moving average still spans its history).
        rows, ema = _series_rows(store, rule, run, since=None if rule["aggregation"] == "ema" else latest)
        rows = [r for r in rows if r[0] >= latest]
        start = {**_fresh_state(), "firing": bool(state and state["firing"])}
        expected = None
    else:
        rows, ema = _series_rows(store, rule, run, since=state["last_step"] + 1, ema=state["ema"])
        start, expected = state, state["last_step"]
    new_state, transitions = _advance(start, rows, rule)
    if not rows:
        return []
    new_state["ema"] = ema
    events = [{"layer": rule["layer"], "state": st, "value": value, "step": step, "created_at": now,
               "evidence": {**evidence, "threshold": rule["threshold"], "comparison": rule["comparison"]}}
              for st, step, value, evidence in transitions]
    ids = store.save_alert_evaluation(rule["id"], run, expected, new_state, events)
    if ids is None:  # another evaluator took these steps
        return []
    return [{"id": i, "rule_id": rule["id"], "rule": rule["name"], "metric": rule["metric"], "scope": rule["scope"],
             "run": run, "expert": rule["expert"], "threshold": rule["threshold"], "comparison": rule["comparison"],
             "aggregation": rule["aggregation"], "webhook": rule["webhook"], "notified": False, **e}
            for i, e in zip(ids, events)]


def evaluate_alerts(store, now: float | None = None, notify: Callable[[dict], Any] | None = None, *,
                    settings=None) -> list[dict]:
    """Evaluate every enabled rule on every run it covers; returns the new firing / resolved events.

    Each new event is passed to `notify`; webhooks get every undelivered event (new ones
    and earlier failures, up to DELIVERY_ATTEMPTS tries each). Failures are counted in
    NOTIFY_STATS and logged, never raised.
    """
    now = time.time() if now is None else float(now)
    known = set(store.runs().run)
    new_events = []
    for rule in list_rules(store, enabled_only=True):
        for run in ([rule["run"]] if rule["run"] is not None else sorted(known)):
            if run not in known:
                continue
            try:
                new_events += _evaluate(store, rule, run, now)
            except Exception as exc:  # one broken rule must not stop the others
                log.warning("alert rule %r on run %r could not be evaluated: %s", rule["name"], run, exc)
    for event in new_events:
        if notify is not None and _notify(notify, event) and not event["webhook"]:
            store.mark_alert_delivered(event["id"])
            event["notified"] = True
    delivered = deliver_pending(store, settings=settings)
    for event in new_events:
        event["notified"] = event["notified"] or event["id"] in delivered
    return new_events


def _notify(notify: Callable[[dict], Any], event: dict) -> bool:
    try:
        notify(payload(event))
        return True
    except Exception as exc:  # a user callback must not break evaluation
        NOTIFY_STATS["failed"] += 1
        log.warning("alert notify callback failed: %s", exc)
        return False


def deliver_pending(store, *, settings=None) -> set[int]:
    """POST every undelivered event to its rule's webhook, oldest first; returns the ids delivered now.

    After a webhook fails, its later events wait for the next evaluation: a dead host
    costs one timeout per evaluation, not one per queued event, and events reach each
    webhook in order.
    """
    allowed = _allowed_hosts(settings)
    delivered, failing = set(), set()
    for row in store.undelivered_alert_events(DELIVERY_ATTEMPTS):
        if row["webhook"] in failing or not store.claim_alert_delivery(row["id"], row["attempts"]):
            continue  # another evaluator is trying this one
        event = {**row, "layer": row["rule_layer"], "aggregation": row["aggregation"] or "window",
                 "scope": _public({"layer": row["rule_layer"], "expert": row["expert"]})["scope"],
                 "attempt": row["attempts"] + 1}
        if post_webhook(row["webhook"], payload(event), allowed_hosts=allowed):
            store.mark_alert_delivered(row["id"])
            delivered.add(row["id"])
        else:
            failing.add(row["webhook"])
    return delivered


def payload(event: dict) -> dict:
    """The JSON body sent to webhooks."""
    keys = ("id", "rule", "rule_id", "metric", "scope", "run", "layer", "expert", "state", "value", "threshold",
            "comparison", "aggregation", "step", "evidence", "created_at")
    return {k: event.get(k) for k in keys} | {"attempt": event.get("attempt", 1)}


def post_webhook(url: str, body: dict, *, timeout: float = 5.0, allowed_hosts: Iterable[str] = ()) -> bool:
    """POST body as JSON; True on a 2xx answer. Failures are counted and logged (URL masked), never raised."""
    try:
        check_webhook(url, allowed_hosts)
        # No redirects: a webhook host cannot bounce the event to a host the allow list refuses.
        resp = httpx.post(url, json=body, timeout=timeout, follow_redirects=False)
        ok = 200 <= resp.status_code < 300
        if not ok:
            log.warning("webhook %s answered %s", mask_webhook(url), resp.status_code)
    except Exception as exc:  # any failure of one delivery is that delivery's alone
        log.warning("webhook %s failed: %s", mask_webhook(url), str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        ok = False
    NOTIFY_STATS["sent" if ok else "failed"] += 1
    return ok
