"""Specialisation page in headless Chromium: domain shares over k/E, top tokens, co-activation, repetition."""
from __future__ import annotations

import pytest

from moescope.analysis import compute_metric
from moescope.dashboard import create_app
from moescope.dashboard.pages.specialisation import token_text, top_tokens
from moescope.settings import Settings
from moescope.token_texts import ByteTokenizer, texts_for

from .browser_support import LiveServer, graph_data, screenshot, severe_console_errors, text_of, wait_for
from .conftest import DEAD, E, K, RUN


def test_specialisation_shows_the_layers_domains_tokens_and_coactivation_for_a_picked_checkpoint(recorded_store, browser):
    layer, dead = next(iter(DEAD.items()))
    with LiveServer(create_app(recorded_store, Settings(api_token=None), refresh_ms=60_000)) as server:
        browser.get(f"{server.url}/dash/specialisation?runs={RUN}&layer={layer}&min_count=2")
        wait_for(browser, graph_data("spec-domain", "data.length === 1"))

        # Pick a checkpoint in the dropdown: every panel narrows to it.
        browser.find_element("css selector", "#spec-checkpoint").click()
        option = wait_for(browser, "return [...document.querySelectorAll('[role=option]')]"
                                   ".find(o => o.innerText.includes('ck-early'));")
        option.click()
        fig = wait_for(browser, graph_data("spec-domain", "title.includes('checkpoint ck-early')"))
        scope = dict(run=RUN, layers=[layer], checkpoint="ck-early", by="window")
        spec = compute_metric(recorded_store, "domain_specialisation", **scope)
        assert fig["data"][0]["y"] == ["code", "prose"] and fig["data"][0]["x"] == [str(e) for e in range(E)]
        want = spec.pivot_table(index="domain", columns="expert", values="share").to_numpy() / (K / E)
        assert [v for row in fig["data"][0]["z"] for v in row] == pytest.approx(list(want.ravel()))
        assert all(row[dead] == 0 for row in fig["data"][0]["z"])  # the dead expert serves no domain
        assert "k/E = 0.500" in fig["title"] and fig["xtitle"] == "expert"

        vocab = compute_metric(recorded_store, "vocab_specialisation", **scope, min_count=2)
        texts = recorded_store.token_texts(RUN)
        want_tokens = top_tokens(vocab, E, texts)
        table = wait_for(browser, text_of("#spec-top-tokens-table", "t.includes('expert')"))
        for row in want_tokens.itertuples():
            assert " ".join(row.tokens.split()) in " ".join(table.split())  # the browser collapses runs of spaces
        assert "as token ids" not in table  # the run recorded the text of its bytes
        assert set(texts) == set(vocab.token_id) | set(texts) and texts == texts_for(ByteTokenizer(), list(texts))
        assert token_text(ord("a"), {ord("a"): "a"}) == "'a'" and token_text(300, texts) == "#300"

        co = wait_for(browser, graph_data("spec-coactivation", "title.includes('ck-early')"))
        pairs = compute_metric(recorded_store, "coactivation", **scope)
        z = co["data"][0]["z"]
        for r in pairs.itertuples():
            assert z[r.expert_i][r.expert_j] == pytest.approx(r.coactivation)
        assert z[dead] == [None] * E  # never chosen: no row

        rep = wait_for(browser, graph_data("spec-repetition", "data.length === 4 && title.includes('ck-early')"))
        want_rep = compute_metric(recorded_store, "repetition", run=RUN, layers=[layer], checkpoint="ck-early",
                                  by="window")
        bars = {t["name"]: t["y"] for t in rep["data"]}
        assert bars["top-1 repeated"] == pytest.approx(list(want_rep.top1_repeat))
        assert bars["random: 1/E"] == pytest.approx(list(want_rep.top1_baseline))
        assert bars["top-k overlap"] == pytest.approx(list(want_rep.topk_overlap))
        assert "checkpoint=ck-early" in browser.current_url
        screenshot(browser, "specialisation")
        assert severe_console_errors(browser) == []
