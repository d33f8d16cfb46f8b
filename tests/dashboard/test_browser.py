"""The dashboard in a real headless Chromium, served by uvicorn on a free local port."""
from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import uvicorn

from moescope.analysis import alerts, compute_metric
from moescope.dashboard import create_app
from moescope.settings import Settings

from .conftest import DEAD, LAYERS, RUN, STEPS, make_frame

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)),
                                reason="needs Debian's chromium and chromium-driver")
WAIT_S = 30


class LiveServer:
    """uvicorn serving the app in a background thread, on a socket bound before start (no port race)."""

    def __init__(self, app):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + WAIT_S
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture
def browser(tmp_path) -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                "--window-size=1400,1900", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, script: str, *args, timeout: float = WAIT_S):
    """Poll a JS expression until it returns something truthy; return that value."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: d.execute_script(script, *args))


def graph_data(element_id: str, condition: str = "true") -> str:
    """JS returning the traces (type, name, x, y, z as plain arrays) of a dcc.Graph once `condition` holds.

    The plotly graph div inside a dcc.Graph keeps its traces in `.data`; arrays plotly.py
    sent base64-typed keep the decoded values in `_inputArray`.
    """
    return (f"const g = document.querySelector('#{element_id} .js-plotly-plot');"
            "if (!g || !g.data || !g.data.length) return null;"
            "const plain = v => v == null ? null : v._inputArray ? v._inputArray"
            "  : ArrayBuffer.isView(v) ? Array.from(v) : Array.isArray(v) ? v.map(plain) : v;"
            "const data = g.data.map(t => ({type: t.type, name: t.name, x: plain(t.x), y: plain(t.y), z: plain(t.z)}));"
            f"return ({condition}) ? data : null;")


def severe_console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_dashboard_renders_heatmap_charts_and_tables_without_console_errors(recorded_store, browser, tmp_path):
    alerts.add_rule(recorded_store, name="imbalance", metric="maxvio", comparison=">", threshold=0.1, run=RUN,
                    window_steps=STEPS)
    assert alerts.evaluate_alerts(recorded_store)
    with LiveServer(create_app(recorded_store, Settings(api_token=None), refresh_ms=1000)) as server:
        browser.get(server.url + "/")  # redirects to /dash/
        heat = wait_for(browser, graph_data("load-heatmap"))
        assert heat[0]["type"] == "heatmap"
        # Default view: the run's newest checkpoint; cells equal the analysis package's load shares.
        want = compute_metric(recorded_store, "load_share", run=RUN, checkpoint="ck-late", by="window")
        z_LE = heat[0]["z"]
        assert len(z_LE) == len(LAYERS) and all(len(row) == 4 for row in z_LE)
        assert [v for row in z_LE for v in row] == pytest.approx(list(want.share))
        layer, expert = next(iter(DEAD.items()))
        assert z_LE[LAYERS.index(layer)][expert] == 0

        maxvio = wait_for(browser, graph_data("maxvio-chart"))
        assert [t["name"] for t in maxvio] == [f"layer {x}" for x in LAYERS] + ["mean over layers"]
        entropy = wait_for(browser, graph_data("entropy-chart"))
        assert [t["name"] for t in entropy] == [f"layer {x}" for x in LAYERS]
        assert list(entropy[0]["x"]) == list(range(STEPS))

        dead = wait_for(browser, "const t = document.querySelector('#dead-experts-table'); return t && t.innerText;")
        assert f"{layer}\t4\t1\t{expert}" in dead  # layer, experts, dead count, dead ids
        panel = wait_for(browser, "const t = document.querySelector('#alerts-table'); return t && t.innerText;")
        assert "imbalance" in panel and "firing" in panel
        domains = wait_for(browser, graph_data("domain-heatmap"))
        assert {y.split(" · ")[1] for y in domains[0]["y"]} == {"code", "prose"}

        # Clearing the checkpoint picker shows the whole run, and the choice survives refreshes.
        browser.find_element("css selector", "#checkpoint-picker .dash-dropdown-clear").click()
        whole = compute_metric(recorded_store, "load_share", run=RUN, by="window")
        assert list(whole.share) != list(want.share)
        title = "const t = document.querySelector('#load-heatmap .gtitle'); return t && t.textContent;"
        wait_for(browser, title.replace("return t && t.textContent;", "return t && t.textContent.includes('all checkpoints');"))
        heat = wait_for(browser, graph_data("load-heatmap"))
        assert [v for row in heat[0]["z"] for v in row] == pytest.approx(list(whole.share))
        time.sleep(1.5)  # at least one refresh tick (1 s here) keeps the cleared choice
        assert "all checkpoints" in browser.execute_script(title)

        # Live runs update: a new step appears in the charts on the next refresh, without a reload.
        recorded_store.write_frame(make_frame(STEPS, np.random.default_rng(99), producer="p1"))
        wait_for(browser, graph_data("maxvio-chart", f"data[0].x.includes({STEPS})"))
        time.sleep(0.5)  # let plotly finish drawing before the screenshot
        browser.save_screenshot(str(tmp_path / "dashboard.png"))
        assert severe_console_errors(browser) == []
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000


def test_empty_store_shows_friendly_message_and_no_errors(empty_store, browser, tmp_path):
    with LiveServer(create_app(empty_store, Settings(api_token=None), refresh_ms=1000)) as server:
        browser.get(server.url + "/dash/")
        message = wait_for(browser, "const m = document.querySelector('#empty-message');"
                                    "return m && m.offsetParent !== null && m.innerText;")
        assert "No runs recorded yet" in message and "moescope demo" in message
        assert browser.execute_script("return document.querySelector('#content').offsetParent") is None
        time.sleep(2.5)  # a couple of refresh cycles on an empty store
        browser.save_screenshot(str(tmp_path / "empty.png"))
        assert severe_console_errors(browser) == []
