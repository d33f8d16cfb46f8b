"""Balance page's per-device charts in headless Chromium: values against the analysis library, a layer's own
devices, and how to record a map for a run that recorded no expert -> device map."""
from __future__ import annotations

import pytest

from moescope.analysis import compute_metric
from moescope.dashboard import create_app
from moescope.dashboard.pages import balance_devices
from moescope.settings import Settings

from .browser_support import LiveServer, graph_data, screenshot, severe_console_errors, type_into, wait_for
from .conftest import RUN, STEPS
from .device_runs import EP_RUN, add_ep_run


def _line(fig, name):
    return next(t for t in fig["data"] if t["name"] == name)


def test_device_charts_follow_the_recorded_map_per_layer_and_over_all_layers(recorded_store, browser):
    add_ep_run(recorded_store)
    with LiveServer(create_app(recorded_store, Settings(api_token=None), refresh_ms=60_000)) as server:
        browser.get(f"{server.url}/dash/balance?runs={EP_RUN},{RUN}")
        tokens = wait_for(browser, graph_data("balance-device-tokens", "data.length === 2"))
        every = compute_metric(recorded_store, "device_load", EP_RUN, combine_layers=True, phase="train")
        for device in (0, 1):
            line = _line(tokens, f"device {device}")
            assert line["x"] == list(range(STEPS))
            assert line["y"] == pytest.approx(list(every[every.device == device].tokens))
        assert "all layers" in tokens["title"] and tokens["xtitle"] == "step"
        # Only the run with a map draws a balancedness line; the other is left out, not drawn as zero.
        balance = wait_for(browser, graph_data("balance-device-balancedness", "data.length === 1"))
        assert _line(balance, EP_RUN)["y"] == pytest.approx(list(every.drop_duplicates("step").balancedness))

        type_into(browser, "balance-layer", "1")
        layer = wait_for(browser, graph_data("balance-device-tokens", "title.includes('layer 1')"))
        one = compute_metric(recorded_store, "device_load", EP_RUN, layers=[1], phase="train")
        assert _line(layer, "device 1")["y"] == pytest.approx(list(one[one.device == 1].tokens))
        per_layer = wait_for(browser, graph_data("balance-device-balancedness", "title.includes('layer 1')"))
        assert _line(per_layer, EP_RUN)["y"] == pytest.approx(list(one.drop_duplicates("step").balancedness))
        wait_for(browser, graph_data("balance-cv", "title.includes('layer 1')"))  # the whole page drawn, for the picture
        screenshot(browser, "balance-devices")
        assert severe_console_errors(browser) == []


def test_a_run_without_a_map_says_how_to_record_one(recorded_store, browser):
    with LiveServer(create_app(recorded_store, Settings(api_token=None), refresh_ms=60_000)) as server:
        browser.get(f"{server.url}/dash/balance?runs={RUN}")
        for graph in ("balance-device-tokens", "balance-device-balancedness"):
            fig = wait_for(browser, graph_data(graph, "notes.length > 0 && !notes.includes('loading…')"))
            assert fig["notes"] == [balance_devices.NO_MAP] and "attach(model, ep_size=N)" in fig["notes"][0]
            assert fig["title"].endswith("— all layers")  # short: the half-width panel shows it whole
        wait_for(browser, graph_data("balance-maxvio", "data.length === 1"))  # the rest of the page is unaffected
        assert severe_console_errors(browser) == []
