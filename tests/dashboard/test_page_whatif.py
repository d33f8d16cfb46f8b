"""Placement & cache what-if page in headless Chromium: every number shown against the analysis library."""
from __future__ import annotations

from urllib.parse import parse_qs, urlparse

import pytest

from moescope.analysis import compute_metric
from moescope.dashboard import create_app
from moescope.settings import Settings

from .browser_support import LiveServer, graph_data, screenshot, severe_console_errors, text_of, type_into, wait_for
from .conftest import E, RUN

POLICIES = ["contiguous", "round_robin", "eplb", "eplb_global", "coactivation"]
LAYER = 1


def _trace(fig, name):
    return next(t for t in fig["data"] if t["name"] == name)


def _placement(store, ep_size, **kw):
    options = dict(run=RUN, layers=[LAYER], steps=(3, 4), fit_steps=(0, 2), ep_size=ep_size, policy=POLICIES,
                   hidden_size=64, dtype="float16", **kw)
    return (compute_metric(store, "placement", by="window", **options),
            compute_metric(store, "placement", by="step", **options))


def _check_placement(browser, store, ep_size):
    summary, per_step = _placement(store, ep_size)
    lines = wait_for(browser, graph_data("wi-balancedness", f"data.length === 5 && title.includes('{ep_size} devices')"))
    assert lines["xtitle"] == "step" and "mean / max" in lines["ytitle"]
    for policy in POLICIES:
        want = per_step[per_step.policy == policy].groupby("step")["balancedness"].first()
        assert _trace(lines, policy)["x"] == [3, 4] and _trace(lines, policy)["y"] == pytest.approx(list(want))

    tokens = wait_for(browser, graph_data("wi-device-tokens", f"title.includes('{ep_size} devices')"))
    bytes_ = wait_for(browser, graph_data("wi-device-bytes", f"title.includes('{ep_size} devices')"))
    assert tokens["xtitle"] == "device" and "bytes" in bytes_["ytitle"]
    for policy in POLICIES:
        mine = per_step[per_step.policy == policy].groupby("device")
        assert _trace(tokens, policy)["x"] == [str(d) for d in range(ep_size)]
        assert _trace(tokens, policy)["y"] == pytest.approx(list(mine.tokens.mean()))
        assert _trace(bytes_, f"{policy} sent")["y"] == pytest.approx(list(mine.bytes_sent.mean()))
        assert _trace(bytes_, f"{policy} received")["y"] == pytest.approx(list(mine.bytes_recv.mean()))

    table = wait_for(browser, text_of("#wi-summary", f"t.includes('fitted on steps 0..2')"))
    for r in summary.itertuples():
        row = next(line for line in table.splitlines() if line.startswith(r.policy + "\t"))
        assert row.split("\t")[1:6] == [f"{r.balancedness:.3f}", f"{r.balancedness_fit:.3f}", f"{r.fit_eval_gap:+.3f}",
                                        f"{r.overload:.3f}×", f"{r.bytes_per_step:,.0f}"]
        assert row.endswith("✓") == bool(r.suggested)
    if ep_size < E:
        best = summary[summary.suggested].iloc[0]
        assert f"Suggested map ({best.policy}): device 0: {', '.join(map(str, best.placement[0]))}" in table
    else:  # one expert per device: every placement balances alike, and the page says why it suggests none
        assert not summary.suggested.any()
        assert "No map suggested" in table and "With one expert per device" in table
    return summary


def test_whatif_page_replays_placements_and_caches_and_reopens_from_its_url(recorded_store, browser):
    with LiveServer(create_app(recorded_store, Settings(api_token=None), refresh_ms=60_000)) as server:
        browser.get(f"{server.url}/dash/whatif?runs={RUN}&layer={LAYER}&step_min=3&step_max=4&fit_min=0&fit_max=2"
                    "&ep_size=2&hidden_size=64&dtype=float16&cache_sizes=1,2,3")
        _check_placement(browser, recorded_store, 2)

        cache = wait_for(browser, graph_data("wi-cache-curve", "data.length === 3"))
        want = compute_metric(recorded_store, "expert_cache", run=RUN, layers=[LAYER], steps=(3, 4), cache_sizes=[1, 2, 3])
        for name, column in (("top-N coverage (best static set)", "coverage"), ("LRU hit rate", "lru_hit_rate"),
                             ("LFU hit rate", "lfu_hit_rate")):
            assert _trace(cache, name)["x"] == [1, 2, 3] and _trace(cache, name)["y"] == pytest.approx(list(want[column]))
        rows = wait_for(browser, text_of("#wi-cache-rows"))
        for r in want.itertuples():
            assert f"{r.cache_size}\t{r.coverage:.2%}\t{r.lru_hit_rate:.2%}\t{r.lfu_hit_rate:.2%}\t{r.accesses:,}" in rows

        # Four devices instead of two: every chart and the table follow, and so does the URL.
        type_into(browser, "wi-ep-size", "4")
        _check_placement(browser, recorded_store, 4)
        url = wait_for(browser, "return window.location.search.includes('ep_size=4') && window.location.href;")
        query = parse_qs(urlparse(url).query)
        assert query["fit_min"] == ["0"] and query["dtype"] == ["float16"] and query["cache_sizes"] == ["1,2,3"]
        screenshot(browser, "whatif")
        shown = browser.execute_script(graph_data("wi-device-bytes"))
        assert severe_console_errors(browser) == []

        browser.get(url)  # the shared link reopens the same view
        again = wait_for(browser, graph_data("wi-device-bytes", "title.includes('4 devices')"))
        assert again["data"] == shown["data"]
        assert severe_console_errors(browser) == []


@pytest.mark.parametrize("query, where, words", [
    ("ep_size=3", "#wi-placement-message", "do not divide over ep_size 3"),
    ("ep_size=2&gpus_per_node=3", "#wi-placement-message", "gpus_per_node must be a positive int dividing ep_size 2"),
    ("policies=eplb,bogus", "#wi-message", "ignored policy 'bogus'"),
    ("dtype=complex128", "#wi-message", "ignored dtype='complex128'"),
    ("fit_min=4&fit_max=1", "#wi-message", "the fit window 4..1 is reversed"),
    ("ep_size=abc", "#wi-message", "ignored ep_size='abc'"),
    ("cache_sizes=0,99", "#wi-cache-message", "ignored cache sizes '0,99'"),
    ("layer=9", "#wi-message", "has no layer 9"),
])
def test_bad_whatif_input_shows_a_message_not_a_traceback(recorded_store, browser, query, where, words):
    with LiveServer(create_app(recorded_store, Settings(api_token=None), refresh_ms=60_000)) as server:
        browser.get(f"{server.url}/dash/whatif?runs={RUN}&{query}")
        message = wait_for(browser, text_of(where, f"t.includes({words!r})"))
        assert "Traceback" not in message
        wait_for(browser, graph_data("wi-cache-curve", "data.length === 3 || notes.length > 0"))
        assert severe_console_errors(browser) == []
