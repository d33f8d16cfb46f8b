"""Who may write: with no token configured, only a server bound to loopback accepts writes."""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest
from fastapi.testclient import TestClient

from moescope.analysis.store import AnalysisStore as Store
from moescope.dashboard import create_app
from moescope.dashboard.deps import is_loopback
from moescope.settings import Settings

from .conftest import RUN, fill_store

RULE = {"name": "too-imbalanced", "metric": "maxvio", "comparison": ">", "threshold": 2.0, "run": RUN}
CLI = [sys.executable, "-c", "from moescope.cli import entry; entry()"]


@pytest.mark.parametrize("host, allowed", [("127.0.0.1", True), ("::1", True), ("localhost", True),
                                           ("0.0.0.0", False), ("10.1.2.3", False), ("::", False)])
def test_without_a_token_only_a_loopback_server_accepts_writes(recorded_store, host, allowed):
    with TestClient(create_app(recorded_store, Settings(api_token=None, host=host))) as client:
        created = client.post("/api/alerts", json=RULE)
        assert created.status_code == (201 if allowed else 403), created.text
        if not allowed:
            assert "no MOESCOPE_API_TOKEN" in created.json()["detail"]
            assert client.get("/api/runs").status_code == 200  # reads stay open


def test_with_a_token_any_host_accepts_authenticated_writes_only(recorded_store):
    with TestClient(create_app(recorded_store, Settings(api_token="t0k", host="0.0.0.0"))) as client:
        assert client.post("/api/alerts", json=RULE).status_code == 401
        assert client.post("/api/alerts", json=RULE, headers={"Authorization": "Bearer t0k"}).status_code == 201


def test_loopback_detection():
    assert is_loopback("127.0.0.2") and is_loopback("[::1]") and not is_loopback("example.org")


def _busy_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_serve_reports_a_busy_port_in_one_line_before_any_address(tmp_path):
    root = tmp_path / "store"
    fill_store(Store(root)).close()
    with _busy_port() as sock:
        proc = subprocess.run([*CLI, "serve", "--store", str(root), "--port", str(sock.getsockname()[1])],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "cannot serve on 127.0.0.1" in proc.stderr


def test_serve_refuses_a_store_that_does_not_exist(tmp_path):
    proc = subprocess.run([*CLI, "serve", "--store", str(tmp_path / "typo")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no store at" in proc.stderr
    assert not (tmp_path / "typo").exists()


def test_serve_on_a_public_address_without_a_token_warns_at_start_up(tmp_path):
    root = tmp_path / "store"
    fill_store(Store(root)).close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([*CLI, "serve", "--store", str(root), "--host", "0.0.0.0", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={k: v for k, v in __import__("os").environ.items() if k != "MOESCOPE_API_TOKEN"})
    try:
        deadline, line = time.monotonic() + 120, ""
        while "warning" not in line and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stderr.readline()
        assert "no MOESCOPE_API_TOKEN" in line and "writes (alert rules) are refused" in line
    finally:
        proc.terminate()
        proc.wait(30)
