"""Capacity what-if page in headless Chromium: predicted drops per factor and layer beside the recorded ones."""
from __future__ import annotations

import pytest

from moescope.analysis import compute_metric
from moescope.dashboard import create_app
from moescope.settings import Settings

from .browser_support import LiveServer, graph_data, screenshot, severe_console_errors, text_of, type_into, wait_for
from .conftest import LAYERS, RUN


def test_capacity_page_predicts_drops_per_factor_pooled_and_per_layer(recorded_store, browser):
    with LiveServer(create_app(recorded_store, Settings(api_token=None), refresh_ms=60_000)) as server:
        browser.get(f"{server.url}/dash/capacity?runs={RUN}")
        type_into(browser, "cap-factors", "1, 1.5, 3")
        curve = wait_for(browser, graph_data("cap-curve", "data.length === 1 && data[0].x.length === 3"))
        want = compute_metric(recorded_store, "predicted_drops", run=RUN, by="window", capacity_factors=[1, 1.5, 3])
        pooled = want.groupby("capacity_factor")[["predicted_dropped", "slots"]].sum()
        assert curve["data"][0]["x"] == [1, 1.5, 3]
        assert curve["data"][0]["y"] == pytest.approx(list(pooled.predicted_dropped / pooled.slots))
        assert curve["data"][0]["y"][0] > curve["data"][0]["y"][-1] == 0  # more capacity, fewer drops
        assert "recorded drop rate 0.00%" in curve["notes"] and "capacity factor" in curve["xtitle"]
        heat = wait_for(browser, graph_data("cap-heatmap", "data.length === 1 && data[0].x.length === 3"))
        assert heat["data"][0]["y"] == [str(x) for x in LAYERS]
        grid = want.pivot_table(index="layer", columns="capacity_factor", values="predicted_drop_rate")
        assert [v for row in heat["data"][0]["z"] for v in row] == pytest.approx(list(grid.to_numpy().ravel()))

        type_into(browser, "cap-layer", "1")
        table = wait_for(browser, text_of("#cap-table", "t.includes('layer 1')"))
        for r in want[want.layer == 1].itertuples():
            assert f"{r.capacity_factor:g}\t{r.slots:,}\t{r.predicted_dropped:,}\t{r.predicted_drop_rate:.2%}" in table
        url = wait_for(browser, "return window.location.search.includes('layer=1') && window.location.href;")
        assert "factors=1%2C+1.5%2C+3" in url
        screenshot(browser, "capacity")
        assert severe_console_errors(browser) == []
        browser.get(url)  # the shared link reopens the same factors and layer
        wait_for(browser, text_of("#cap-table", "t.includes('layer 1')"))
        assert browser.find_element("id", "cap-factors").get_attribute("value") == "1, 1.5, 3"


def test_capacity_page_names_a_bad_factor_list(recorded_store, browser):
    with LiveServer(create_app(recorded_store, Settings(api_token=None), refresh_ms=60_000)) as server:
        browser.get(f"{server.url}/dash/capacity?runs={RUN}&factors=abc,-1")
        wait_for(browser, text_of("#cap-message", "t.includes(\"ignored capacity factors 'abc,-1'\")"))
        wait_for(browser, graph_data("cap-curve", "data.length === 1 && data[0].x.length === 4"))  # the defaults
        assert severe_console_errors(browser) == []
