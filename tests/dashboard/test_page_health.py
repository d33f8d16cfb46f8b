"""Router health page in headless Chromium: p05–p95 bands and means against the analysis library."""
from __future__ import annotations

import pandas as pd
import pytest

from moescope.analysis import compute_metric
from moescope.dashboard import create_app, figures
from moescope.settings import Settings

from .browser_support import LiveServer, graph_data, screenshot, severe_console_errors, text_of, type_into, wait_for
from .conftest import LAYERS, RUN, STEPS


def _trace(fig, name):
    return next(t for t in fig["data"] if t["name"] == name)


def test_health_bands_match_the_analysis_quantiles_and_follow_the_picked_layer(recorded_store, browser):
    with LiveServer(create_app(recorded_store, Settings(api_token=None), refresh_ms=60_000)) as server:
        browser.get(f"{server.url}/dash/health?runs={RUN}&layer=1")
        for metric in ("entropy", "z", "margin"):
            fig = wait_for(browser, graph_data(f"health-{metric}", "title.includes('layer 1')"))
            want = compute_metric(recorded_store, metric, run=RUN, layers=[1], by="step")
            assert _trace(fig, "mean")["x"] == list(range(STEPS))
            assert _trace(fig, "mean")["y"] == pytest.approx(list(want["mean"]))
            assert _trace(fig, "p05–p95")["y"] == pytest.approx(list(want["p05"]))
            assert _trace(fig, "p95")["y"] == pytest.approx(list(want["p95"]))
            assert fig["xtitle"] == "step" and fig["ytitle"]
        verdicts = compute_metric(recorded_store, "collapse", run=RUN)
        table = wait_for(browser, text_of("#health-collapse-table"))
        for r in verdicts.itertuples():  # layer, verdict, onset step ("—" without an onset)
            onset = "—" if pd.isna(r.onset_step) else str(int(r.onset_step))
            assert f"{r.layer}\t{r.verdict}\t{onset}\t" in table
        assert "<NA>" not in table
        heat = wait_for(browser, graph_data("health-layer-heatmap", "data.length === 1"))
        means = compute_metric(recorded_store, "entropy", run=RUN, by="step", quantiles=False)
        assert heat["data"][0]["y"] == list(LAYERS)
        assert heat["data"][0]["z"][0] == pytest.approx(list(means[means.layer == 0]["mean"]))

        # A click on layer 0 of the heatmap picks it; smoothing applies the debiased EMA to the band and mean.
        browser.execute_script("document.querySelector('#health-layer-heatmap .js-plotly-plot')"
                               ".emit('plotly_click', {points: [{x: 0, y: 0}]});")
        wait_for(browser, graph_data("health-entropy", "title.includes('layer 0')"))
        type_into(browser, "health-smoothing", "0.5")
        want = compute_metric(recorded_store, "entropy", run=RUN, layers=[0], by="step")
        smooth = wait_for(browser, graph_data("health-entropy", "title.includes('layer 0') && "
                                              f"Math.abs(data[2].y[1] - {float(want['mean'].iloc[1])}) > 1e-9"))
        assert _trace(smooth, "mean")["y"] == pytest.approx(list(figures.ema(want["mean"], 0.5)))
        url = wait_for(browser, "return window.location.search.includes('smoothing=0.5') && window.location.href;")
        assert "layer=0" in url
        screenshot(browser, "health")
        assert severe_console_errors(browser) == []
        browser.get(url)  # the shared link reopens layer 0, smoothed
        again = wait_for(browser, graph_data("health-entropy", "title.includes('layer 0') && data.length >= 3"))
        assert _trace(again, "mean")["y"] == pytest.approx(_trace(smooth, "mean")["y"])
        assert severe_console_errors(browser) == []


def test_health_page_with_an_unknown_run_says_so(recorded_store, browser):
    with LiveServer(create_app(recorded_store, Settings(api_token=None), refresh_ms=60_000)) as server:
        browser.get(f"{server.url}/dash/health?runs=nope&step_min=abc")
        text = wait_for(browser, "const v = document.querySelector('.view'); if (!v) return null; const t = v.innerText;"
                                 "return t.includes(\"unknown run(s) 'nope'\") && t.includes('ignored step_min') && t;")
        assert "Traceback" not in text
        assert severe_console_errors(browser) == []
