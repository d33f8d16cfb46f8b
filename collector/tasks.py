"""Scheduled maintenance tasks. Small and idempotent; they take no objects, only ids.

Frames do not travel as tasks (see collector/ingest.py); these run from the beat schedule.
Alert evaluation is analysis work: its task lives in moescope.analysis.tasks.
"""
from __future__ import annotations

import logging
import time

from moescope.collector.celery_app import app, current_settings
from moescope.collector.store import Store

log = logging.getLogger(__name__)


def _store() -> Store:
    settings = current_settings()
    return Store(settings.store, settings.database_url)


@app.task(name="moescope.compact", ignore_result=True)
def compact(run: str | None = None) -> int:
    """Merge small segments (of one run, or all); returns the number of files retired."""
    store = _store()
    try:
        return store.compact(run)
    finally:
        store.close()


@app.task(name="moescope.retention", ignore_result=True)
def retention() -> dict:
    """Delete retired segment files past their grace period, and runs past settings.retention_days."""
    settings, store = current_settings(), _store()
    try:
        out = {"swept": store.sweep(), "runs_deleted": 0}
        if settings.retention_days is not None:
            out["runs_deleted"] = store.delete_runs_before(time.time() - settings.retention_days * 86400)
        return out
    finally:
        store.close()
