"""The Celery app: broker, safe serialisation, the ingest bootstep, and the beat schedule.

    celery -A moescope.collector.celery_app worker      # or: moescope worker
    celery -A moescope.collector.celery_app beat        # or: moescope beat

Configuration comes from moescope.settings (env MOESCOPE_*). No pickle anywhere: tasks
take and return JSON. Frames never travel as Celery messages; the ingest bootstep reads
them from the frame stream (see collector/ingest.py).
"""
from __future__ import annotations

import os
from pathlib import Path

from celery import Celery
from click import Option

from moescope.collector.ingest import IngestStep
from moescope.collector.segment_fs import is_url
from moescope.settings import Settings, get_settings

# Task modules by name: the alert task belongs to analysis, which the collector never imports.
app = Celery("moescope", include=["moescope.collector.tasks", "moescope.analysis.tasks"])
app.steps["worker"].add(IngestStep)
app.user_options["worker"].add(Option(("--ingest-threads",), type=int, default=None,
                                      help="frame-stream consumer threads in this worker (default: settings.ingest_threads)"))

_settings: Settings | None = None


def current_settings() -> Settings:
    global _settings
    if _settings is None:
        _settings = get_settings()
    return _settings


def _schedule_file(settings: Settings) -> str:
    """Beat's record of last runs: in the store directory, or the working directory for a store on object storage."""
    return "celerybeat-schedule" if is_url(settings.store) else str(Path(settings.store) / "celerybeat-schedule")


def _make_store_dir(settings: Settings) -> None:
    if not is_url(settings.store):
        Path(settings.store).mkdir(parents=True, exist_ok=True)


def configure(settings: Settings) -> Celery:
    """Point the app at `settings` (broker, store, schedule intervals)."""
    global _settings
    _settings = settings
    schedule = {
        "compact": {"task": "moescope.compact", "schedule": settings.compact_interval_s},
        "retention": {"task": "moescope.retention", "schedule": settings.compact_interval_s},
        "alerts": {"task": "moescope.evaluate_alerts", "schedule": settings.alert_interval_s},
    }
    app.conf.update(
        broker_url=settings.broker_url,
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        beat_schedule=schedule,
        beat_schedule_filename=_schedule_file(settings),
    )
    return app


configure(current_settings())


def _export_env(settings: Settings) -> None:
    # Pool children and `celery` re-imports read settings from the environment.
    for name in ("store", "database_url", "broker_url", "stream", "dead_letter_stream", "claim_idle_s", "ack_ttl_s",
                 "ingest_threads"):
        value = getattr(settings, name)
        if value is not None:
            os.environ[f"MOESCOPE_{name.upper()}"] = str(value)


def run_worker(settings: Settings, concurrency: int = 1, *, ingest_threads: int | None = None, pool: str = "threads",
               loglevel: str = "INFO", hostname: str | None = None) -> int:
    """Run a Celery worker (ingest bootstep + scheduled tasks) in this process until stopped."""
    if concurrency < 1:
        raise ValueError(f"--concurrency must be >= 1, got {concurrency}")
    _export_env(settings)
    configure(settings)
    _make_store_dir(settings)
    argv = ["worker", f"--concurrency={concurrency}", f"--pool={pool}", f"--loglevel={loglevel}",
            f"--ingest-threads={ingest_threads or settings.ingest_threads}", "--without-gossip", "--without-mingle"]
    if hostname:
        argv.append(f"--hostname={hostname}")
    app.worker_main(argv)
    return 0


def run_beat(settings: Settings, loglevel: str = "INFO") -> int:
    """Run the scheduler (compaction, retention, alert evaluation) in this process until stopped."""
    _export_env(settings)
    configure(settings)
    _make_store_dir(settings)
    app.start(["beat", f"--loglevel={loglevel}", f"--schedule={_schedule_file(settings)}"])
    return 0
