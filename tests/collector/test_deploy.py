"""Deployment: the compose file validates and the Celery app never accepts pickle."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def _compose(*args, password: str | None = "s3cret"):
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose binary not installed")
    env = {k: v for k, v in os.environ.items() if k != "MOESCOPE_REDIS_PASSWORD"}
    if password is not None:
        env["MOESCOPE_REDIS_PASSWORD"] = password
    return subprocess.run([binary, "-f", str(ROOT / "docker-compose.yml"), "config", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def test_docker_compose_file_validates_and_every_service_has_a_health_check():
    check = _compose("-q")
    assert check.returncode == 0, check.stderr
    yaml = pytest.importorskip("yaml")
    services = yaml.safe_load(_compose().stdout)["services"]
    assert {"redis", "postgres", "worker", "beat", "server"} <= set(services)
    assert all("healthcheck" in spec for spec in services.values())
    assert services["worker"]["environment"]["MOESCOPE_BROKER_URL"] == "redis://:s3cret@redis:6379/0"


def test_compose_redis_needs_a_password_and_publishes_no_public_port():
    yaml = pytest.importorskip("yaml")
    refused = _compose("-q", password=None)
    assert refused.returncode != 0 and "MOESCOPE_REDIS_PASSWORD" in refused.stderr
    redis = yaml.safe_load(_compose().stdout)["services"]["redis"]
    assert "--requirepass" in redis["command"]
    for port in redis.get("ports", []):
        host_ip = port.get("host_ip") if isinstance(port, dict) else str(port).rsplit(":", 2)[0]
        assert host_ip == "127.0.0.1", port


def test_celery_app_is_json_only_with_late_acks_and_a_beat_schedule():
    from moescope.collector.celery_app import app

    conf = app.conf
    assert conf.task_serializer == "json" and list(conf.accept_content) == ["json"]
    assert "pickle" not in {conf.result_serializer, conf.event_serializer}
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert {entry["task"] for entry in conf.beat_schedule.values()} == {
        "moescope.compact", "moescope.retention", "moescope.evaluate_alerts"}
    app.loader.import_default_modules()  # the task modules the app names, as a worker loads them

    assert {"moescope.compact", "moescope.retention", "moescope.evaluate_alerts"} <= set(app.tasks)
