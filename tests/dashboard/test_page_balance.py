"""Balance page in headless Chromium: values against the analysis library, layer drill-down, smoothing, shared URLs."""
from __future__ import annotations

from urllib.parse import parse_qs, urlparse

import pytest

from moescope.analysis import compute_metric
from moescope.dashboard import create_app, figures
from moescope.settings import Settings

from .browser_support import (LiveServer, graph_data, screenshot, severe_console_errors, type_into,
                              wait_for)
from .conftest import DEAD, LAYERS, RUN, STEPS, fill_store

OTHER = "synthetic-b"


def _line(fig, name):
    return next(t for t in fig["data"] if t["name"] == name)


def test_balance_overlays_runs_drills_into_a_layer_smooths_and_reopens_from_its_url(recorded_store, browser):
    fill_store(recorded_store, seed=7, run=OTHER)
    with LiveServer(create_app(recorded_store, Settings(api_token=None), refresh_ms=60_000)) as server:
        browser.get(f"{server.url}/dash/balance?runs={RUN},{OTHER}")
        fig = wait_for(browser, graph_data("balance-maxvio", "data.length === 2"))
        for run in (RUN, OTHER):  # mean over layers per step, as the analysis library computes it
            want = compute_metric(recorded_store, "maxvio", run=run, by="step").groupby("step")["maxvio"].mean()
            assert _line(fig, run)["x"] == list(range(STEPS)) and _line(fig, run)["y"] == pytest.approx(list(want))
        assert fig["xtitle"] == "step" and "MaxVio" in fig["ytitle"]
        heat = wait_for(browser, graph_data("balance-layer-heatmap", "data.length === 1"))
        assert heat["data"][0]["y"] == list(LAYERS) and heat["data"][0]["x"] == list(range(STEPS))

        # Drill down: a click on layer 1 of the heatmap picks that layer for every chart.
        dead_layer, dead_expert = next(iter(DEAD.items()))
        browser.execute_script("const g = document.querySelector('#balance-layer-heatmap .js-plotly-plot');"
                               f"g.emit('plotly_click', {{points: [{{x: 0, y: {dead_layer}}}]}});")
        cv = wait_for(browser, graph_data("balance-cv", f"title.includes('layer {dead_layer}')"))
        want_cv = compute_metric(recorded_store, "cv", run=RUN, layers=[dead_layer], by="step")
        assert _line(cv, RUN)["y"] == pytest.approx(list(want_cv.cv))
        experts = wait_for(browser, graph_data("balance-expert-heatmap", f"title.includes('layer {dead_layer}')"))
        util = compute_metric(recorded_store, "utilisation", run=RUN, layers=[dead_layer], by="step")
        z = experts["data"][0]["z"]
        assert z[dead_expert] == [0.0] * STEPS  # the dead expert's row is empty at every step
        assert [v for row in z for v in row] == pytest.approx(list(util.sort_values(["expert", "step"]).utilisation))

        # Smoothing: the drawn line is TensorBoard's debiased EMA of the metric; the fixed colour scale pins 0–3.
        type_into(browser, "balance-smoothing", "0.6")
        browser.find_element("css selector", "#balance-fixed input").click()
        smooth = wait_for(browser, graph_data("balance-switch_score", "data.length === 4"))  # raw + smoothed per run
        want_switch = compute_metric(recorded_store, "switch_score", run=RUN, layers=[dead_layer], by="step")
        assert _line(smooth, RUN)["y"] == pytest.approx(list(figures.ema(want_switch.switch_score, 0.6)))
        wait_for(browser, graph_data("balance-expert-heatmap", "title.includes('fixed scale')"))
        url = wait_for(browser, "return window.location.search.includes('smoothing') && "
                                "window.location.search.includes('fixed_scale') && window.location.href;")
        query = parse_qs(urlparse(url).query)
        assert query["layer"] == [str(dead_layer)] and query["smoothing"] == ["0.6"] and query["fixed_scale"] == ["1"]
        assert query["runs"] == [f"{RUN},{OTHER}"]
        screenshot(browser, "balance")
        shown = browser.execute_script(graph_data("balance-switch_score"))
        assert severe_console_errors(browser) == []

        # The shared URL reopens the same view.
        browser.get(url)
        again = wait_for(browser, graph_data("balance-switch_score", "data.length === 4"))
        assert again["data"] == shown["data"] and again["title"] == shown["title"]
        assert browser.find_element("id", "balance-layer").get_attribute("value") == str(dead_layer)
        assert severe_console_errors(browser) == []


@pytest.mark.parametrize("query, words", [
    ("runs=no-such-run", "unknown run(s) 'no-such-run'"),
    (f"runs={RUN}&layer=abc", "ignored layer='abc': not an integer"),
    (f"runs={RUN}&layer=77", "has no layer 77"),
    (f"runs={RUN}&step_min=0&step_max=99999999999999999999999", "ignored step_max"),
    (f"runs={RUN}&step_min=5&step_max=1", "step_min is after step_max"),
    (f"runs={RUN}&smoothing=2", "ignored smoothing='2'"),
])
def test_bad_balance_urls_show_a_message_not_a_traceback(recorded_store, browser, query, words):
    with LiveServer(create_app(recorded_store, Settings(api_token=None), refresh_ms=60_000)) as server:
        browser.get(f"{server.url}/dash/balance?{query}")
        message = wait_for(browser, "return document.querySelector('.view') && document.querySelector('.view').innerText"
                                    f".includes({words!r}) && document.querySelector('.view').innerText;")
        assert "Traceback" not in message
        wait_for(browser, graph_data("balance-maxvio"))
        assert severe_console_errors(browser) == []


def test_balance_charts_pick_up_new_steps_of_a_live_run_without_a_reload(recorded_store, browser):
    import numpy as np

    from .conftest import make_frame

    with LiveServer(create_app(recorded_store, Settings(api_token=None), refresh_ms=1000)) as server:
        browser.get(f"{server.url}/dash/balance?runs={RUN}")
        wait_for(browser, graph_data("balance-maxvio", f"data.length === 1 && data[0].x.length === {STEPS}"))
        assert recorded_store.write_frame(make_frame(STEPS, np.random.default_rng(99), producer="p1"))
        fig = wait_for(browser, graph_data("balance-maxvio", f"data[0].x.includes({STEPS})"))
        want = compute_metric(recorded_store, "maxvio", run=RUN, by="step").groupby("step")["maxvio"].mean()
        assert fig["data"][0]["y"] == pytest.approx(list(want))
        assert severe_console_errors(browser) == []
