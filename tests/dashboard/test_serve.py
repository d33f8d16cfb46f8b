"""serve(): the function `moescope serve` runs, started as its own process like the CLI does."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx

from moescope.analysis import alerts
from moescope.analysis.store import AnalysisStore as Store

from .conftest import RUN, fill_store


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_api_and_dashboard_until_stopped(tmp_path):
    root = tmp_path / "store"
    fill_store(Store(root)).close()
    port = _free_port()
    code = ("from moescope.collector.store import Store; from moescope.dashboard import serve; "
            f"serve(Store({str(root)!r}), '127.0.0.1', {port})")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
        while True:
            try:
                health = httpx.get(base + "/healthz", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read().decode()
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.2)
        assert health.json()["runs"] == 1
        assert [r["run"] for r in httpx.get(base + "/api/runs").json()] == [RUN]
        page = httpx.get(base + "/", follow_redirects=True)
        assert page.status_code == 200 and str(page.url).endswith("/dash/") and "_dash-renderer" in page.text
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_serve_with_evaluate_alerts_fires_rules_without_beat(tmp_path):
    root = tmp_path / "store"
    store = fill_store(Store(root))
    rule = alerts.add_rule(store, name="imbalance", metric="maxvio", comparison=">", threshold=0.1, run=RUN)
    port = _free_port()
    env = {**os.environ, "MOESCOPE_ALERT_INTERVAL_S": "0.2"}
    proc = subprocess.Popen([sys.executable, "-m", "moescope", "serve", "--store", str(root), "--port", str(port),
                             "--evaluate-alerts"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while not alerts.list_events(store, run=RUN):
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "no alert event from the server's own evaluation"
            time.sleep(0.2)
        [event] = alerts.list_events(store, run=RUN)
        assert event["state"] == "firing" and event["rule_id"] == rule["id"]
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0].decode()
        store.close()
    assert "evaluating alert rules every 0.2 s" in out
