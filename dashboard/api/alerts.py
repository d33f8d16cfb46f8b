"""Alert rules (create, read, delete; writes need the bearer token) and their firing / resolved events."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, status
from pydantic import BaseModel, Field

from moescope.analysis import alerts
from moescope.dashboard.deps import StoreDep, WriteAccess

router = APIRouter(prefix="/api/alerts", tags=["alerts"])


class AlertRuleIn(BaseModel):
    name: str = Field(description="unique rule name")
    metric: str = Field(description=f"one of {', '.join(alerts.ALERT_METRICS)}")
    comparison: Literal[">", ">=", "<", "<="] = Field(">", description="how the value is compared with the threshold")
    threshold: float = Field(description="the value the metric is compared with")
    run: str | None = Field(None, description="only this run (default: every run)")
    layer: int | None = Field(None, description="only this layer (default: averaged over layers)")
    expert: int | None = Field(None, description="only this expert (maxvio, dead_experts, drop_rate)")
    window_steps: int = Field(50, description="evaluate over the last N steps")
    for_evaluations: int = Field(1, description="consecutive breaching evaluations before it fires")
    webhook: str | None = Field(None, description="http(s) URL that receives each event as JSON")
    enabled: bool = True


def _rule_key(rule: str) -> int | str:
    # Numeric path segments are ids, anything else a rule name.
    return int(rule) if rule.isdigit() else rule


@router.get("")
def list_alert_rules(store: StoreDep) -> list[dict[str, Any]]:
    """Every alert rule with its scope (run, layer or expert)."""
    return alerts.list_rules(store)


@router.post("", status_code=status.HTTP_201_CREATED, dependencies=[WriteAccess])
def create_alert_rule(body: AlertRuleIn, store: StoreDep) -> dict[str, Any]:
    """Create an alert rule (needs the bearer token when one is configured)."""
    try:
        return alerts.add_rule(store, **body.model_dump())
    except ValueError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None


@router.get("/events")
def list_alert_events(
    store: StoreDep,
    run: Annotated[str | None, Query(description="only events of this run")] = None,
    rule_id: Annotated[int | None, Query(description="only events of this rule")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000, description="newest first, at most this many")] = 200,
) -> list[dict[str, Any]]:
    """Firing and resolved alert events, newest first."""
    return alerts.list_events(store, rule_id=rule_id, run=run, limit=limit)


@router.get("/{rule}")
def get_alert_rule(rule: str, store: StoreDep) -> dict[str, Any]:
    """One alert rule, by id or name."""
    key = _rule_key(rule)
    for r in alerts.list_rules(store):
        if r["id"] == key or r["name"] == key:
            return r
    raise HTTPException(status_code=404, detail=f"no alert rule {rule!r}")


@router.delete("/{rule}", status_code=status.HTTP_204_NO_CONTENT, dependencies=[WriteAccess])
def delete_alert_rule(rule: str, store: StoreDep) -> None:
    """Delete an alert rule (by id or name) and its events (needs the bearer token when one is configured)."""
    if not alerts.delete_rule(store, _rule_key(rule)):
        raise HTTPException(status_code=404, detail=f"no alert rule {rule!r}")
