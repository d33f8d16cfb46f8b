"""Routing metrics of a run (METRICS.md), computed by moescope.analysis."""
from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Response

from moescope.analysis import METRICS, compute_metric
from moescope.dashboard.deps import RunDep, StoreDep, records

router = APIRouter(prefix="/api/runs", tags=["metrics"])

# Open-ended step bounds when only one side is given (steps are int64 in the record).
_STEP_LO, _STEP_HI = -(2**62), 2**62


def parse_layers(values: list[str] | None) -> list[int] | None:
    """`layers=0,2` or `layers=0&layers=2` -> [0, 2]; 400 naming the bad value otherwise."""
    if not values:
        return None
    out = []
    for part in (p.strip() for v in values for p in v.split(",")):
        if not part:
            continue
        try:
            out.append(int(part))
        except ValueError:
            raise HTTPException(status_code=400, detail=f"layers must be integers, got {part!r}") from None
    return out or None


@router.get("/{run}/metrics/{name}")
def get_metric(
    run: RunDep,
    name: str,
    store: StoreDep,
    layers: Annotated[list[str] | None, Query(description="layer ids, comma-separated or repeated")] = None,
    step_min: Annotated[int | None, Query(description="first step, inclusive")] = None,
    step_max: Annotated[int | None, Query(description="last step, inclusive")] = None,
    checkpoint: Annotated[str | None, Query(description="only rows of this checkpoint")] = None,
    by: Annotated[Literal["step", "window"] | None, Query(description="a row per step, or one window summary")] = None,
) -> Response:
    """One metric of a run as JSON records; columns as documented per metric in METRICS.md."""
    if name not in METRICS:
        raise HTTPException(status_code=400, detail=f"unknown metric {name!r}; valid metrics: {', '.join(METRICS)}")
    steps = None
    if step_min is not None or step_max is not None:
        steps = (_STEP_LO if step_min is None else step_min, _STEP_HI if step_max is None else step_max)
    try:
        df = compute_metric(store, name, run=run, layers=parse_layers(layers), steps=steps, checkpoint=checkpoint, by=by)
    except ValueError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    return records(df)
