"""Where a run's experts live and the load each device carried (METRICS.md §21)."""
from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, Field

from moescope.analysis import compute_metric
from moescope.analysis.device_load import recorded_map
from moescope.dashboard.api.metrics import parse_layers
from moescope.dashboard.api.whatif import Layers, Phase, StepMax, StepMin, _expert_map, _rows, _steps
from moescope.dashboard.deps import RunDep, StoreDep

router = APIRouter(prefix="/api/runs", tags=["devices"])


class DeviceMap(BaseModel):
    """The expert -> device map a run recorded at attach time."""

    source: str = Field(description="given (expert_devices=), ep_size (contiguous), or the framework it was read from")
    num_devices: int = Field(description="G: devices 0..G-1, the ranks of the expert-parallel group")
    layers: dict[int, list[list[int]]] = Field(description="layer -> per expert, the devices holding it (more than one: replicas)")


class DeviceLoadRow(BaseModel):
    """One device at one step (by=step) or over the window (by=window), for one layer or all of them."""

    step: int | None = Field(None, description="training step (by=step only)")
    layer: int | None = Field(None, description="MoE layer (absent with combine_layers)")
    device: int = Field(description="device index, 0..G-1")
    tokens: float = Field(description="(token, slot) assignments the device computed; replicas split an expert's evenly")
    balancedness: float | None = Field(description="mean over max tokens per device (1 = balanced); over several "
                                                   "layers or steps Σ mean / Σ max")
    overload: float | None = Field(description="max over mean tokens per device")
    steps: int | None = Field(None, description="steps in the window (by=window only)")
    overload_max: float | None = Field(None, description="the worst step's overload (by=window only)")


def _override(text: str | None) -> list[list[int]] | None:
    try:
        return _expert_map(text)
    except HTTPException:
        raise HTTPException(status_code=400, detail=f"expert_devices must be devices per expert like 0,0,1,1 "
                                                    f"(replicas 0+2), got {text!r}") from None


@router.get("/{run}/devices", response_model=DeviceMap)
def get_device_map(run: RunDep, store: StoreDep) -> dict:
    """The expert -> device map the run recorded; 404 when it recorded none."""
    try:
        found = recorded_map(store, run)
    except ValueError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None
    if found is None:
        raise HTTPException(status_code=404, detail=f"run {run!r} recorded no expert -> device map")
    return {"source": found.source, "num_devices": found.num_devices,
            "layers": {layer: [list(e) for e in m] for layer, m in sorted(found.layers.items())}}


@router.get("/{run}/devices/load", response_model=list[DeviceLoadRow])
def get_device_load(
    run: RunDep, store: StoreDep, layers: Layers = None, step_min: StepMin = None, step_max: StepMax = None,
    phase: Phase = None,
    by: Annotated[Literal["step", "window"], Query(description="a row per step, or one over the window")] = "step",
    combine_layers: Annotated[bool, Query(description="sum the layers: balancedness Σ mean / Σ max over them")] = False,
    ep_size: Annotated[int | None, Query(ge=1, le=65535, description="override: contiguous over this many devices")] = None,
    expert_devices: Annotated[str | None, Query(description="override: device of each expert, e.g. 0,0,1,1; replicas 0+2")] = None,
) -> list[dict]:
    """Tokens per device, balancedness and overload under the run's recorded map (or an override)."""
    try:
        df = compute_metric(store, "device_load", run=run, layers=parse_layers(layers), steps=_steps(step_min, step_max),
                            phase=phase, by=by, combine_layers=combine_layers, ep_size=ep_size,
                            expert_devices=_override(expert_devices))
    except ValueError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    return _rows(df)
