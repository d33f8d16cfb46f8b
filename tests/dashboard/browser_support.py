"""Helpers for the browser tests: uvicorn on a free port, JS probes of the page, console errors, screenshots."""
from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import uvicorn

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
HAVE_CHROMIUM = bool(shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER))
WAIT_S = 60  # generous: the CPU is shared; every wait is on a condition, never a fixed time
SCREENSHOTS = Path(__file__).parent / "screenshots"


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


def make_driver(profile_dir: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                "--window-size=1400,1900", f"--user-data-dir={profile_dir}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def wait_for(driver, script: str, *args, timeout: float = WAIT_S):
    """Poll a JS expression until it returns something truthy; return that value."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.25).until(lambda d: d.execute_script(script, *args))


def graph_data(element_id: str, condition: str = "true") -> str:
    """JS returning a dcc.Graph's traces (type, name, x, y, z as plain arrays) and title once `condition` holds.

    The plotly graph div inside a dcc.Graph keeps its traces in `.data`; arrays plotly.py
    sent base64-typed keep the decoded values in `_inputArray`.
    """
    return (f"const g = document.querySelector('#{element_id} .js-plotly-plot');"
            "if (!g || !g.data || !g.layout) return null;"
            "const plain = v => v == null ? null : v._inputArray ? Array.from(v._inputArray)"
            "  : ArrayBuffer.isView(v) ? Array.from(v) : Array.isArray(v) ? v.map(plain) : v;"
            "const data = g.data.map(t => ({type: t.type, name: t.name, x: plain(t.x), y: plain(t.y), z: plain(t.z),"
            "  customdata: plain(t.customdata)}));"
            "const title = String(g.layout.title && (typeof g.layout.title === 'string' ? g.layout.title"
            "  : g.layout.title.text || '') || '');"
            "const notes = (g.layout.annotations || []).map(a => a.text);"
            "const xtitle = g.layout.xaxis && g.layout.xaxis.title && g.layout.xaxis.title.text || '';"
            "const ytitle = g.layout.yaxis && g.layout.yaxis.title && g.layout.yaxis.title.text || '';"
            "const fig = {data: data, title: title, notes: notes, xtitle: xtitle, ytitle: ytitle};"
            f"return ({condition}) ? fig : null;")


def text_of(selector: str, condition: str = "t.length > 0") -> str:
    """JS returning an element's innerText once `condition` (on t) holds."""
    return (f"const e = document.querySelector({selector!r}); if (!e) return null; const t = e.innerText;"
            f"return ({condition}) ? t : null;")


def severe_console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def type_into(driver, element_id: str, text: str) -> None:
    """Replace a debounced dcc.Input's value and commit it with Enter."""
    from selenium.webdriver.common.keys import Keys

    box = wait_for(driver, f"return document.getElementById({element_id!r});")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.BACKSPACE)
    box.send_keys(text + Keys.ENTER)


def screenshot(driver, name: str) -> Path:
    """Save a full-window screenshot to tests/dashboard/screenshots/<name>.png (git-ignored)."""
    SCREENSHOTS.mkdir(exist_ok=True)
    # Let plotly finish its last draw: wait until no graph is marked as loading.
    wait_for(driver, "return !document.querySelector('[data-dash-is-loading=\"true\"]');")
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, max(900, min(int(height) + 40, 6000)))
    path = SCREENSHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path
