"""Runs and what the store knows about each: health at a glance, checkpoints, layers, the ingest ledger."""
from __future__ import annotations

from fastapi import APIRouter, Response

from moescope.dashboard import summaries
from moescope.dashboard.api.models import Checkpoint, Layer, LedgerRow, RunHealth, RunSummary
from moescope.dashboard.deps import RunDep, StoreDep, records

router = APIRouter(prefix="/api/runs", tags=["runs"])


@router.get("", response_model=list[RunSummary])
def list_runs(store: StoreDep) -> Response:
    """Recorded runs with checkpoint, layer, frame and routing-row counts and the last write time."""
    return records(store.runs())


@router.get("/health", response_model=list[RunHealth])
def list_run_health(store: StoreDep) -> Response:
    """Each run's health over its last 50 steps, newest run first: what the dashboard's Runs page shows."""
    return records(summaries.runs_health(store))


@router.get("/{run}/checkpoints", response_model=list[Checkpoint])
def list_checkpoints(run: RunDep, store: StoreDep) -> Response:
    """Checkpoints of a run, in step order."""
    return records(store.checkpoints(run))


@router.get("/{run}/layers", response_model=list[Layer])
def list_layers(run: RunDep, store: StoreDep) -> Response:
    """MoE layers of a run: module path, experts, top-k, router kind, capacity factor."""
    return records(store.layers(run))


@router.get("/{run}/ledger", response_model=list[LedgerRow])
def get_ledger(run: RunDep, store: StoreDep) -> Response:
    """Ingest reconciliation per producer: frames sent, stored, dead-lettered, dropped, missing."""
    return records(store.ledger(run))
