"""The rank filter in headless Chromium: Balance and the Runs page read only the picked ranks' rows."""
from __future__ import annotations

import dataclasses
from urllib.parse import parse_qs, urlparse

import numpy as np
import pyarrow as pa
import pytest

from moescope.analysis import compute_metric
from moescope.dashboard import create_app, summaries
from moescope.settings import Settings

from .browser_support import LiveServer, graph_data, screenshot, severe_console_errors, text_of, wait_for
from .conftest import RUN, STEPS, make_frame


def add_rank(store, rank: int, seed: int) -> None:
    """The same steps of RUN as recorded by another rank (its own producer, other routing)."""
    rng = np.random.default_rng(seed)
    for step in range(STEPS):
        frame = make_frame(step, rng, producer=f"p-rank{rank}")
        tables = {name: t.set_column(t.schema.get_field_index("rank"), "rank", pa.array(np.full(t.num_rows, rank, np.int32)))
                  for name, t in frame.tables.items()}
        assert store.write_frame(dataclasses.replace(frame, tables=tables))


def test_balance_and_runs_filter_by_rank_and_keep_it_in_the_url(recorded_store, browser):
    add_rank(recorded_store, 1, seed=5)
    with LiveServer(create_app(recorded_store, Settings(api_token=None), refresh_ms=60_000)) as server:
        browser.get(f"{server.url}/dash/balance?runs={RUN}&ranks=1")
        fig = wait_for(browser, graph_data("balance-maxvio", "data.length === 1 && title.includes('rank 1')"))
        want = compute_metric(recorded_store, "maxvio", run=RUN, by="step", ranks=[1]).groupby("step")["maxvio"].mean()
        both = compute_metric(recorded_store, "maxvio", run=RUN, by="step").groupby("step")["maxvio"].mean()
        assert fig["data"][0]["y"] == pytest.approx(list(want)) and fig["data"][0]["y"] != pytest.approx(list(both))
        options = wait_for(browser, "const o = [...document.querySelectorAll('#balance-ranks .dash-dropdown-value-item')]"
                                    ".map(e => e.innerText); return o.length ? o : null;")
        assert options == ["1"]

        # Clearing the filter counts every rank again, and the URL follows.
        browser.find_element("css selector", "#balance-ranks .dash-dropdown-clear").click()
        fig = wait_for(browser, graph_data("balance-maxvio", "!title.includes('rank')"))
        assert fig["data"][0]["y"] == pytest.approx(list(both))
        wait_for(browser, "return !window.location.search.includes('ranks');")

        # The Runs page summarises the picked rank only.
        browser.get(f"{server.url}/dash/?ranks=0")
        table = wait_for(browser, text_of("#runs-table", "t.includes('rank 0 only')"))
        row = next(line.split("\t") for line in table.splitlines() if line.startswith(RUN))
        health = summaries.run_health(recorded_store, RUN, ranks=[0])
        assert row[3] == f"{health['maxvio']:.3f}" and row[4] == f"{health['dead_experts']} of {health['experts']}"
        assert health["maxvio"] != summaries.run_health(recorded_store, RUN)["maxvio"]
        browser.find_element("css selector", "#runs-select label").click()
        link = wait_for(browser, "const a = document.querySelector('#runs-open-balance'); return a && a.href;")
        assert parse_qs(urlparse(link).query)["ranks"] == ["0"]
        screenshot(browser, "runs-rank")
        assert severe_console_errors(browser) == []


def test_a_bad_rank_in_the_url_is_named(recorded_store, browser):
    with LiveServer(create_app(recorded_store, Settings(api_token=None), refresh_ms=60_000)) as server:
        browser.get(f"{server.url}/dash/balance?runs={RUN}&ranks=abc,7")
        wait_for(browser, text_of("#balance-message", "t.includes(\"ignored ranks='abc'\")"))
        wait_for(browser, text_of("#balance-rank-note", "t.includes('no rank 7 in the picked runs; ranks 0')"))
        fig = wait_for(browser, graph_data("balance-maxvio", "data.length === 1 && !title.includes('rank')"))
        want = compute_metric(recorded_store, "maxvio", run=RUN, by="step").groupby("step")["maxvio"].mean()
        assert fig["data"][0]["y"] == pytest.approx(list(want))
        assert severe_console_errors(browser) == []
