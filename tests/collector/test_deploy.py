"""Deployment: the compose file validates and the Celery app never accepts pickle."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def test_docker_compose_file_validates_and_every_service_has_a_health_check():
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose binary not installed")
    compose = str(ROOT / "docker-compose.yml")
    check = subprocess.run([binary, "-f", compose, "config", "-q"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    yaml = pytest.importorskip("yaml")
    rendered = subprocess.run([binary, "-f", compose, "config"], capture_output=True, text=True, timeout=60, check=True)
    services = yaml.safe_load(rendered.stdout)["services"]
    assert set(services) == {"redis", "postgres", "worker", "beat", "server"}
    assert all("healthcheck" in spec for spec in services.values())
    assert services["worker"]["environment"]["MOESCOPE_BROKER_URL"] == "redis://redis:6379/0"


def test_celery_app_is_json_only_with_late_acks_and_a_beat_schedule():
    from moescope.collector.celery_app import app

    conf = app.conf
    assert conf.task_serializer == "json" and list(conf.accept_content) == ["json"]
    assert "pickle" not in {conf.result_serializer, conf.event_serializer}
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert {entry["task"] for entry in conf.beat_schedule.values()} == {
        "moescope.compact", "moescope.retention", "moescope.evaluate_alerts"}
    import moescope.collector.tasks  # noqa: F401 - registers the scheduled tasks

    assert {"moescope.compact", "moescope.retention", "moescope.evaluate_alerts"} <= set(app.tasks)
