"""Runs and what the store knows about each: checkpoints, layers, the ingest ledger."""
from __future__ import annotations

from fastapi import APIRouter, Response

from moescope.dashboard.deps import RunDep, StoreDep, records

router = APIRouter(prefix="/api/runs", tags=["runs"])


@router.get("")
def list_runs(store: StoreDep) -> Response:
    """Recorded runs with checkpoint, layer, frame and routing-row counts and the last write time."""
    return records(store.runs())


@router.get("/{run}/checkpoints")
def list_checkpoints(run: RunDep, store: StoreDep) -> Response:
    """Checkpoints of a run, in step order."""
    return records(store.checkpoints(run))


@router.get("/{run}/layers")
def list_layers(run: RunDep, store: StoreDep) -> Response:
    """MoE layers of a run: module path, experts, top-k, router kind, capacity factor."""
    return records(store.layers(run))


@router.get("/{run}/ledger")
def get_ledger(run: RunDep, store: StoreDep) -> Response:
    """Ingest reconciliation per producer: frames sent, stored, dead-lettered, dropped, missing."""
    return records(store.ledger(run))
