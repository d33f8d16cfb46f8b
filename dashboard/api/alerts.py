"""Alert rules (create, read, delete; writes need the bearer token), their events, and the series each watches.

Rules are addressed as `/api/alerts/{rule}`: ASCII digits are a rule id, anything else a
rule name (names may not be all digits, so the two never collide). When a token is
configured, readers without it see webhook URLs masked to scheme://host/***.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Response, status
from pydantic import BaseModel, Field

from moescope.analysis import alerts
from moescope.collector.store import UnknownRun
from moescope.dashboard.deps import Authenticated, SettingsDep, StoreDep, WriteAccess, records
from moescope.schema import SchemaError, check_run_id

router = APIRouter(prefix="/api/alerts", tags=["alerts"])
Count = Annotated[int, Field(ge=0, le=alerts.INT32_MAX)]


class AlertRuleIn(BaseModel):
    name: str = Field(description="unique rule name (not all digits: numbers address rules by id)", max_length=200)
    metric: str = Field(description=f"one of {', '.join(alerts.ALERT_METRICS)}")
    comparison: Literal[">", ">=", "<", "<="] = Field(">", description="how the value is compared with the threshold")
    threshold: float = Field(description="the value the metric is compared with")
    run: str | None = Field(None, description="only this recorded run (default: every run)")
    layer: Count | None = Field(None, description="only this layer of the run (default: averaged over layers)")
    expert: Count | None = Field(None, description="only this expert (maxvio, dead_experts, drop_rate)")
    aggregation: str = Field("window", description="the series compared: step (each step alone), window (the last "
                                                   "window_steps steps pooled) or ema (moving average of the per-step value)")
    window_steps: Annotated[int, Field(ge=1, le=alerts.INT32_MAX)] | None = Field(
        None, description="aggregation window: pool the last N steps (default 50)")
    ema_alpha: float | None = Field(None, description="aggregation ema: weight of the newest step, 0 < alpha <= 1")
    ema_span: float | None = Field(None, description="aggregation ema: span N >= 1, alpha = 2 / (N + 1)")
    for_evaluations: Annotated[int, Field(ge=1, le=alerts.INT32_MAX)] = Field(
        1, description="consecutive breaching steps before it fires")
    webhook: str | None = Field(None, description="http(s) URL that receives each event as JSON")
    enabled: bool = True


def _find(store, rule: str) -> dict:
    try:
        found = alerts.get_rule(store, alerts.rule_key(rule))
    except ValueError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    if found is None:
        raise HTTPException(status_code=404, detail=f"no alert rule {rule!r}")
    return found


def _shown(rule: dict, authenticated: bool) -> dict:
    return rule if authenticated else {**rule, "webhook": alerts.mask_webhook(rule.get("webhook"))}


@router.get("")
def list_alert_rules(store: StoreDep, authenticated: Authenticated) -> list[dict[str, Any]]:
    """Every alert rule with its scope and aggregation (webhook URLs masked without the token)."""
    return [_shown(r, authenticated) for r in alerts.list_rules(store)]


@router.post("", status_code=status.HTTP_201_CREATED, dependencies=[WriteAccess])
def create_alert_rule(body: AlertRuleIn, store: StoreDep, settings: SettingsDep) -> dict[str, Any]:
    """Create an alert rule (needs the bearer token when one is configured); 400 names what is wrong."""
    try:
        return alerts.add_rule(store, **body.model_dump(), settings=settings)
    except ValueError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None


@router.get("/events")
def list_alert_events(
    store: StoreDep,
    run: Annotated[str | None, Query(description="only events of this run")] = None,
    rule_id: Annotated[int | None, Query(ge=0, le=alerts.INT32_MAX, description="only events of this rule")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000, description="newest first, at most this many")] = 200,
) -> list[dict[str, Any]]:
    """Firing and resolved alert events, newest first."""
    if run is not None:
        try:
            check_run_id(run)
        except SchemaError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
    return alerts.list_events(store, rule_id=rule_id, run=run, limit=limit)


@router.get("/{rule}")
def get_alert_rule(rule: str, store: StoreDep, authenticated: Authenticated) -> dict[str, Any]:
    """One alert rule, by id or name (webhook URL masked without the token)."""
    return _shown(_find(store, rule), authenticated)


@router.get("/{rule}/series")
def alert_rule_series(rule: str, store: StoreDep,
                      run: Annotated[str, Query(description="the run to evaluate the rule on")]) -> Response:
    """The series the rule compares with its threshold on a run: step, value, threshold, holds."""
    found = _find(store, rule)
    try:
        return records(alerts.rule_series(store, found, run))
    except UnknownRun as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None
    except ValueError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None


@router.get("/{rule}/replay")
def alert_rule_replay(rule: str, store: StoreDep,
                      run: Annotated[str, Query(description="the run whose history is replayed")]) -> list[dict[str, Any]]:
    """When the rule would have fired and resolved over the run's recorded steps (one evaluation per step)."""
    found = _find(store, rule)
    try:
        return alerts.replay(store, found, run)
    except UnknownRun as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None
    except ValueError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None


@router.delete("/{rule}", status_code=status.HTTP_204_NO_CONTENT, dependencies=[WriteAccess])
def delete_alert_rule(rule: str, store: StoreDep) -> None:
    """Delete an alert rule (by id or name) and its events (needs the bearer token when one is configured)."""
    if not alerts.delete_rule(store, _find(store, rule)["id"]):
        raise HTTPException(status_code=404, detail=f"no alert rule {rule!r}")
