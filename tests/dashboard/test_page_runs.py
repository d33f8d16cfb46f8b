"""Runs page in headless Chromium: health at a glance per run, picking runs to overlay."""
from __future__ import annotations

import pytest

from moescope.analysis import alerts, compute_metric
from moescope.dashboard import create_app, summaries
from moescope.settings import Settings

from .browser_support import LiveServer, graph_data, screenshot, severe_console_errors, text_of, wait_for
from .conftest import RUN, STEPS, fill_store

OTHER = "synthetic-b"


def test_runs_page_shows_each_runs_health_and_opens_the_picked_runs_overlaid(recorded_store, browser):
    fill_store(recorded_store, seed=7, run=OTHER)
    alerts.add_rule(recorded_store, name="imbalance", metric="maxvio", comparison=">", threshold=0.1, run=RUN,
                    window_steps=STEPS)
    assert alerts.evaluate_alerts(recorded_store)
    with LiveServer(create_app(recorded_store, Settings(api_token=None), refresh_ms=60_000)) as server:
        browser.get(server.url + "/")  # redirects to /dash/, the Runs page
        table = wait_for(browser, text_of("#runs-table", f"t.includes({OTHER!r})"))
        rows = {line.split("\t")[0]: line.split("\t") for line in table.splitlines()[1:]}
        assert set(rows) == {RUN, OTHER}
        for run in (RUN, OTHER):
            maxvio = compute_metric(recorded_store, "maxvio", run=run, by="window")["maxvio_global_mean_layers"].iloc[0]
            dead = compute_metric(recorded_store, "dead_experts", run=run, by="window")
            status, last_step, shown_maxvio, shown_dead, drop_rate, firing = rows[run][1:7]
            assert status == "recording" and last_step == str(STEPS - 1)
            assert shown_maxvio == f"{maxvio:.3f}" and drop_rate == "0.00%"
            assert shown_dead == f"{dead.dead.sum()} of {dead.num_experts.sum()}"
            assert firing == ("1" if run == RUN else "0")
            verdict = summaries.collapse_verdict(recorded_store, run)  # None where collapse detection is absent
            assert rows[run][7] == (verdict or "—")
        # A run with alerts firing links to its Alerts page.
        link = browser.find_element("css selector", "#runs-table a.alerts-link")
        assert link.text == "1" and link.get_attribute("href").endswith(f"/dash/alerts?runs={RUN}")

        # Tick both runs: the links open them overlaid, and the pick is in the URL.
        for label in browser.find_elements("css selector", "#runs-select label"):
            label.click()
        # Wait for the link to carry both picks (each click updates it in turn).
        link = wait_for(browser, "const a = document.querySelector('#runs-open-balance'); "
                                 "return a && a.href.includes('%2C') && a.href;")
        assert f"runs={RUN}%2C{OTHER}" in link or f"runs={OTHER}%2C{RUN}" in link
        assert "runs=" in browser.current_url
        screenshot(browser, "runs")
        browser.find_element("id", "runs-open-balance").click()
        fig = wait_for(browser, graph_data("balance-maxvio", "data.filter(t => t.type === 'scatter').length === 2"))
        assert {t["name"] for t in fig["data"]} == {RUN, OTHER}
        assert severe_console_errors(browser) == []


def test_runs_page_on_an_empty_store_says_how_to_record_one(empty_store, browser):
    with LiveServer(create_app(empty_store, Settings(api_token=None), refresh_ms=60_000)) as server:
        browser.get(server.url + "/dash/")
        message = wait_for(browser, text_of("#runs-table-holder"))
        assert "No runs recorded yet" in message and "moescope demo" in message
        assert severe_console_errors(browser) == []


@pytest.mark.parametrize("query, words", [("?runs=..%2Fetc", "not a valid run id"),
                                          ("?runs=" + ",".join(f"r{i}" for i in range(20)), "showing the first 8"),
                                          ("?runs=no-such-run", "unknown run(s) 'no-such-run'")])
def test_runs_page_names_bad_runs_in_the_url_instead_of_failing(recorded_store, browser, query, words):
    with LiveServer(create_app(recorded_store, Settings(api_token=None), refresh_ms=60_000)) as server:
        browser.get(server.url + "/dash/" + query)
        message = wait_for(browser, text_of("#runs-message", f"t.includes({words!r})"))
        assert "Traceback" not in message
        wait_for(browser, text_of("#runs-table", f"t.includes({RUN!r})"))
        assert severe_console_errors(browser) == []
