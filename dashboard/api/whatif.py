"""What-if on a recorded run: expert placement over EP devices, and a hot-set expert cache."""
from __future__ import annotations

import math
from typing import Annotated, Literal

import pandas as pd
from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, Field

from moescope.analysis import compute_metric
from moescope.analysis.placement import POLICIES
from moescope.dashboard.api.metrics import parse_layers
from moescope.dashboard.deps import RunDep, StoreDep

router = APIRouter(prefix="/api/runs", tags=["whatif"])

Policy = Literal[(*POLICIES, "all")]  # type: ignore[valid-type]


class PlacementSummary(BaseModel):
    """One placement policy on one layer, over the evaluated window."""

    policy: str
    layer: int
    ep_size: int
    steps: int = Field(description="steps in the evaluated window")
    balancedness: float | None = Field(description="mean over steps of mean/max tokens per device (1 = perfectly balanced)")
    balancedness_min: float | None
    overload: float | None = Field(description="mean over steps of max device tokens / balanced share")
    overload_max: float | None
    copies_per_step: float | None = Field(description="all-to-all dispatch copies per step, all devices (combine mirrors it)")
    bytes_per_step: float | None = Field(description="copies × hidden_size × dtype bytes; null without hidden_size")
    bytes_sent_max: float | None = Field(description="mean over steps of the busiest device's dispatch bytes")
    bytes_internode_per_step: float | None
    balancedness_fit: float | None = Field(description="balancedness on the fit window (in-sample)")
    copies_per_step_fit: float | None
    fit_eval_gap: float | None = Field(description="balancedness_fit − balancedness")
    balancedness_hindsight: float | None = Field(description="the same policy fitted on the evaluated window itself")
    staleness: float | None = Field(description="balancedness_hindsight − balancedness: the cost of fitting on the past")
    current: str = Field(description="the placement compared against: map when an expert_map is given, else recorded "
                                     "when the run recorded its expert -> device map, else contiguous")
    improvement: float | None = Field(description="balancedness / the current placement's")
    traffic_ratio: float | None = Field(description="copies_per_step / the current placement's")
    suggested: bool = Field(description="the load-aware policy suggested for this layer (chosen on the fit window)")
    placement: list[list[int]] = Field(description="device -> logical experts in its slots")


class PlacementDevice(BaseModel):
    """One device at one step under one policy."""

    policy: str
    step: int
    layer: int
    device: int
    node: int
    tokens: float = Field(description="(token, slot) assignments computed on the device")
    balancedness: float | None
    overload: float | None
    copies_sent: float | None
    copies_recv: float | None
    copies_sent_internode: float | None
    bytes_sent: float | None
    bytes_recv: float | None
    bytes_sent_internode: float | None


class CacheRow(BaseModel):
    """A cache of cache_size experts on one layer (at one step when asked per step)."""

    step: int | None = None
    layer: int
    cache_size: int
    num_experts: int
    coverage: float | None = Field(description="share of assignments taken by the cache_size most loaded experts")
    lru_hit_rate: float | None
    lfu_hit_rate: float | None
    accesses: int


def _steps(lo: int | None, hi: int | None) -> tuple[int, int] | None:
    if lo is None and hi is None:
        return None
    if any(v is not None and abs(v) > 2**62 for v in (lo, hi)):
        raise HTTPException(status_code=400, detail=f"step bounds must be within ±2**62, got {lo}, {hi}")
    return (-(2**62) if lo is None else lo, 2**62 if hi is None else hi)


def _expert_map(text: str | None) -> list[list[int]] | None:
    if not text:
        return None
    try:
        return [[int(d) for d in part.split("+")] for part in text.split(",")]
    except ValueError:
        raise HTTPException(status_code=400, detail=f"expert_map must be devices per expert like 0,0,1,1 (replicas 0+2), "
                                                    f"got {text!r}") from None


def _rows(df: pd.DataFrame) -> list[dict]:
    """Records with NaN as None (pydantic turns them into JSON null)."""
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in df.to_dict("records")]


Layers = Annotated[list[str] | None, Query(description="layer ids, comma-separated or repeated")]
StepMin = Annotated[int | None, Query(description="first step of the evaluated window, inclusive")]
StepMax = Annotated[int | None, Query(description="last step of the evaluated window, inclusive")]
Phase = Annotated[str | None, Query(description="only rows of this phase: train, eval, prefill or decode")]


def _placement(store, run, by, layers, step_min, step_max, phase, fit_step_min, fit_step_max, ep_size, gpus_per_node,
               redundant_slots, policy, expert_map, expert_groups, hidden_size, dtype) -> list[dict]:
    try:
        df = compute_metric(store, "placement", run=run, layers=parse_layers(layers), steps=_steps(step_min, step_max),
                            phase=phase, by=by, ep_size=ep_size, gpus_per_node=gpus_per_node, redundant_slots=redundant_slots,
                            policy=policy or None, expert_map=_expert_map(expert_map), expert_groups=expert_groups,
                            hidden_size=hidden_size, dtype=dtype, fit_steps=_steps(fit_step_min, fit_step_max))
    except ValueError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    return _rows(df)


@router.get("/{run}/whatif/placement", response_model=list[PlacementSummary])
def get_placement_whatif(
    run: RunDep, store: StoreDep, layers: Layers = None, step_min: StepMin = None, step_max: StepMax = None,
    phase: Phase = None, fit_step_min: Annotated[int | None, Query(description="first step the load-aware policies are fitted on")] = None,
    fit_step_max: Annotated[int | None, Query(description="last step they are fitted on (default: the evaluated window)")] = None,
    ep_size: Annotated[int | None, Query(description="expert-parallel devices (default: the largest of 1..8 dividing E)")] = None,
    gpus_per_node: Annotated[int | None, Query(description="devices per node (default: all on one node)")] = None,
    redundant_slots: Annotated[int, Query(description="extra expert slots for replicas")] = 0,
    policy: Annotated[list[Policy] | None, Query(description="one or more policies (repeat), or all")] = None,
    expert_map: Annotated[str | None, Query(description="device of each expert, e.g. 0,0,1,1; replicas 0+2")] = None,
    expert_groups: Annotated[int, Query(description="EPLB expert groups")] = 1,
    hidden_size: Annotated[int | None, Query(description="hidden size, to turn copies into bytes")] = None,
    dtype: Annotated[str, Query(description="dtype the all-to-all sends")] = "bfloat16",
) -> list[dict]:
    """Placement what-if per layer and policy: balance and all-to-all traffic, fit/eval gap, suggested map."""
    return _placement(store, run, "window", layers, step_min, step_max, phase, fit_step_min, fit_step_max, ep_size, gpus_per_node,
                      redundant_slots, policy, expert_map, expert_groups, hidden_size, dtype)


@router.get("/{run}/whatif/placement/devices", response_model=list[PlacementDevice])
def get_placement_devices(
    run: RunDep, store: StoreDep, layers: Layers = None, step_min: StepMin = None, step_max: StepMax = None,
    phase: Phase = None, fit_step_min: int | None = None, fit_step_max: int | None = None, ep_size: int | None = None,
    gpus_per_node: int | None = None, redundant_slots: int = 0,
    policy: Annotated[list[Policy] | None, Query(description="one or more policies (repeat), or all")] = None,
    expert_map: str | None = None, expert_groups: int = 1, hidden_size: int | None = None, dtype: str = "bfloat16",
) -> list[dict]:
    """Placement what-if per step and device: tokens, balancedness, overload, copies and bytes sent and received."""
    return _placement(store, run, "step", layers, step_min, step_max, phase, fit_step_min, fit_step_max, ep_size, gpus_per_node,
                      redundant_slots, policy, expert_map, expert_groups, hidden_size, dtype)


@router.get("/{run}/whatif/cache", response_model=list[CacheRow])
def get_cache_whatif(
    run: RunDep, store: StoreDep, layers: Layers = None, step_min: StepMin = None, step_max: StepMax = None,
    phase: Phase = None, cache_sizes: Annotated[list[int] | None, Query(description="experts held by the cache (repeat); default 1, 2, 4")] = None,
    by: Annotated[Literal["step", "window"], Query(description="a row per step, or one over the window")] = "window",
) -> list[dict]:
    """Hot-set cache what-if per layer and cache size: top-N coverage, LRU and LFU hit rates over the recorded order."""
    try:
        df = compute_metric(store, "expert_cache", run=run, layers=parse_layers(layers), steps=_steps(step_min, step_max),
                            phase=phase, by=by, cache_sizes=cache_sizes or (1, 2, 4))
    except ValueError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    return _rows(df)
