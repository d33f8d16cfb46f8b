"""Drift and Compare pages in headless Chromium, on probe-set replays of two checkpoints in two runs."""
from __future__ import annotations

import pytest

from moescope.analysis import compute_metric
from moescope.dashboard import create_app
from moescope.settings import Settings

from .browser_support import LiveServer, graph_data, screenshot, severe_console_errors, text_of, wait_for
from .conftest import PROBE_SET, RUN, add_replays, fill_store

OTHER = "synthetic-b"


@pytest.fixture
def replayed_store(recorded_store):
    fill_store(recorded_store, seed=7, run=OTHER)
    add_replays(recorded_store)
    add_replays(recorded_store, OTHER, seed=12)
    return recorded_store


def _trace(fig, name):
    return next(t for t in fig["data"] if t["name"] == name)


def test_drift_shows_saturation_fluctuation_load_divergence_and_two_checkpoints_domains(replayed_store, browser):
    with LiveServer(create_app(replayed_store, Settings(api_token=None), refresh_ms=60_000)) as server:
        browser.get(f"{server.url}/dash/drift?runs={RUN}&layer=1")
        sat = wait_for(browser, graph_data("drift-saturation", "data.length === 3"))
        want = compute_metric(replayed_store, "saturation", run=RUN, probe_set=PROBE_SET)
        layer1 = want[want.layer == 1]
        assert _trace(sat, "layer 1")["x"] == ["ck-early", "ck-late"]
        assert _trace(sat, "layer 1")["y"] == pytest.approx(list(layer1.saturation))
        assert _trace(sat, "random (k/E)")["y"] == pytest.approx([0.5, 0.5])
        fl = wait_for(browser, graph_data("drift-fluctuation", "data.length === 1"))
        want_fl = compute_metric(replayed_store, "fluctuation", run=RUN, layers=[1], probe_set=PROBE_SET)
        assert fl["data"][0]["y"] == pytest.approx(list(want_fl.cdf))
        js = wait_for(browser, graph_data("drift-load-js", "data.length === 1"))
        want_js = compute_metric(replayed_store, "load_js", run=RUN, checkpoint_a="ck-early", checkpoint_b="ck-late",
                                 probe_set=PROBE_SET)
        assert js["data"][0]["x"] == ["ck-early → ck-late"]
        assert [row[0] for row in js["data"][0]["z"]] == pytest.approx(list(want_js.js))
        a = wait_for(browser, graph_data("drift-domain-a", "title.includes('ck-early')"))
        b = wait_for(browser, graph_data("drift-domain-b", "title.includes('ck-late')"))
        spec = compute_metric(replayed_store, "domain_specialisation", run=RUN, layers=[1], checkpoint="ck-late",
                              by="window")
        grid = spec.pivot_table(index="domain", columns="expert", values="share").to_numpy() / 0.5
        assert [v for row in b["data"][0]["z"] for v in row] == pytest.approx(list(grid.ravel()))
        assert a["data"][0]["z"] != b["data"][0]["z"]
        screenshot(browser, "drift")
        assert severe_console_errors(browser) == []


def test_drift_without_replays_says_what_to_record(recorded_store, browser):
    with LiveServer(create_app(recorded_store, Settings(api_token=None), refresh_ms=60_000)) as server:
        browser.get(f"{server.url}/dash/drift?runs={RUN}")
        text = wait_for(browser, text_of("#drift-message", "t.includes('probe set')"))
        assert "Traceback" not in text
        assert severe_console_errors(browser) == []


def test_compare_aligns_two_runs_experts_and_reopens_from_its_url(replayed_store, browser):
    with LiveServer(create_app(replayed_store, Settings(api_token=None), refresh_ms=60_000)) as server:
        browser.get(f"{server.url}/dash/compare?runs={RUN},{OTHER}&layer=1&checkpoint=ck-early")
        agreement = wait_for(browser, graph_data("cmp-agreement", "title.includes('ck-early')"))
        align = compute_metric(replayed_store, "alignment", run=RUN, run_b=OTHER, checkpoint_a="ck-early",
                               probe_set=PROBE_SET)
        per_layer = align.groupby("layer")["agreement"].first()
        assert _trace(agreement, "tokens on matched experts")["y"] == pytest.approx(list(per_layer))
        assert _trace(agreement, "random routing (1/E)")["y"] == pytest.approx([0.25, 0.25])
        table = wait_for(browser, text_of("#cmp-alignment-table"))
        layer1 = align[align.layer == 1]
        for r in layer1.itertuples():
            assert f"{r.expert_a}\t{r.expert_b}\t{r.co_assigned}\t{r.tokens_a}" in table
        load = wait_for(browser, graph_data("cmp-load", "data.length === 2"))
        share_b = compute_metric(replayed_store, "load_share", run=OTHER, layers=[1], checkpoint="ck-late",
                                 by="window").set_index("expert")["share"]
        assert load["data"][1]["y"] == pytest.approx(list(share_b.reindex(layer1.expert_b)))  # B in A's order
        url = wait_for(browser, "return window.location.search.includes('synthetic-b') && window.location.href;")
        screenshot(browser, "compare")
        assert severe_console_errors(browser) == []
        browser.get(url)
        again = wait_for(browser, graph_data("cmp-agreement", "title.includes('ck-early')"))
        assert again["data"] == agreement["data"]
        assert severe_console_errors(browser) == []
