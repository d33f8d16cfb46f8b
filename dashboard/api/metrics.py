"""Routing metrics of a run (METRICS.md), computed by moescope.analysis."""
from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Response

from moescope.analysis import METRICS, compute_metric
from moescope.dashboard.api.models import METRIC_ROWS
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


Layers = Annotated[list[str] | None, Query(description="layer ids, comma-separated or repeated")]
StepMin = Annotated[int | None, Query(ge=_STEP_LO, le=_STEP_HI, description="first step, inclusive")]
StepMax = Annotated[int | None, Query(ge=_STEP_LO, le=_STEP_HI, description="last step, inclusive")]
CheckpointQ = Annotated[str | None, Query(max_length=500, description="only rows of this checkpoint")]
By = Annotated[Literal["step", "window"] | None, Query(description="a row per step, or one window summary")]


def metric_records(store, name: str, run: str, layers, step_min, step_max, checkpoint, by) -> Response:
    if name not in METRICS:
        raise HTTPException(status_code=400, detail=f"unknown metric {name!r}; valid metrics: {', '.join(METRICS)}")
    steps = None
    if step_min is not None or step_max is not None:
        steps = (_STEP_LO if step_min is None else step_min, _STEP_HI if step_max is None else step_max)
    try:
        df = compute_metric(store, name, run=run, layers=parse_layers(layers), steps=steps, checkpoint=checkpoint, by=by)
    except ValueError as exc:
        raise HTTPException(status_code=400, detail=str(exc).splitlines()[0]) from None
    return records(df)


def _typed_route(name: str) -> None:
    """GET /api/runs/{run}/metrics/<name>, documented with that metric's columns."""
    def endpoint(run: RunDep, store: StoreDep, layers: Layers = None, step_min: StepMin = None,
                 step_max: StepMax = None, checkpoint: CheckpointQ = None, by: By = None) -> Response:
        return metric_records(store, name, run, layers, step_min, step_max, checkpoint, by)

    metric = METRICS[name]
    router.add_api_route(f"/{{run}}/metrics/{name}", endpoint, methods=["GET"], response_model=list[METRIC_ROWS[name]],
                         name=f"get_metric_{name}", summary=f"{name}: {metric.summary}",
                         description=f"{metric.summary} (METRICS.md), from the `{metric.source}` table; "
                                     f"default by={metric.default_by}. " + " ".join(metric.doc.split()))


for _name in METRIC_ROWS:
    if _name in METRICS:
        _typed_route(_name)


@router.get("/{run}/metrics/{name}")
def get_metric(run: RunDep, name: str, store: StoreDep, layers: Layers = None, step_min: StepMin = None,
               step_max: StepMax = None, checkpoint: CheckpointQ = None, by: By = None) -> Response:
    """Any metric of a run as JSON records (the typed routes above document each one's columns)."""
    return metric_records(store, name, run, layers, step_min, step_max, checkpoint, by)
