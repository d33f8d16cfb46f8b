"""Alerts page in headless Chromium: rules created and deleted with the API token, the series a rule
evaluates, events linking to the balance charts at their step."""
from __future__ import annotations

import pytest

from moescope.analysis import alerts
from moescope.dashboard import create_app
from moescope.settings import Settings

from .browser_support import LiveServer, graph_data, screenshot, severe_console_errors, text_of, type_into, wait_for
from .conftest import RUN, STEPS

TOKEN = "page-token"


def _click_option(browser, dropdown_id: str, text: str) -> None:
    browser.find_element("css selector", f"#{dropdown_id}").click()
    wait_for(browser, "return [...document.querySelectorAll('[role=option]')]"
                      f".find(o => o.innerText.includes({text!r}));").click()


def test_alert_rules_are_written_with_the_token_plotted_against_their_threshold_and_events_link_to_balance(
        recorded_store, browser):
    with LiveServer(create_app(recorded_store, Settings(api_token=TOKEN), refresh_ms=1500)) as server:
        browser.get(f"{server.url}/dash/alerts?runs={RUN}")
        wait_for(browser, text_of("#alerts-rules", "t.includes('no alert rules yet')"))
        browser.find_element("id", "alerts-new-name").send_keys("imbalance")
        type_into(browser, "alerts-new-threshold", "0.1")
        browser.find_element("id", "alerts-new-run").send_keys(RUN)
        type_into(browser, "alerts-new-window", str(STEPS))

        # Without the token nothing is written.
        browser.find_element("id", "alerts-create").click()
        wait_for(browser, text_of("#alerts-write-result", "t.includes('missing or wrong API token')"))
        assert alerts.list_rules(recorded_store) == []

        browser.find_element("id", "alerts-token").send_keys(TOKEN)
        browser.find_element("id", "alerts-create").click()
        wait_for(browser, text_of("#alerts-write-result", "t.includes(\"created rule\")"))
        [rule] = alerts.list_rules(recorded_store)
        assert (rule["name"], rule["metric"], rule["threshold"], rule["run"]) == ("imbalance", "maxvio", 0.1, RUN)
        wait_for(browser, text_of("#alerts-rules-table", "t.includes('imbalance') && t.includes('> 0.1')"))
        # No evaluator has run it yet (no beat here): the table says so, and what would evaluate it.
        wait_for(browser, text_of("#alerts-rules-table", "t.includes('not yet')"))
        assert "moescope serve --evaluate-alerts" in wait_for(browser, text_of("#alerts-not-evaluated"))

        # The rule's own series, against its threshold, as the alerts module evaluates it.
        _click_option(browser, "alerts-rule", "imbalance")
        fig = wait_for(browser, graph_data("alerts-series", "title.includes('imbalance')"))
        series = alerts.rule_series(recorded_store, rule["id"], RUN)
        line = next(t for t in fig["data"] if t["name"] == "maxvio")
        assert line["x"] == list(series.step) and line["y"] == pytest.approx(list(series.value))
        assert "threshold" in fig["notes"]
        assert f"rule={rule['id']}" in browser.current_url

        # A firing event appears on the next refresh and links to the run's balance charts at its step.
        [event] = alerts.evaluate_alerts(recorded_store)
        assert event["state"] == "firing"
        events = wait_for(browser, text_of("#alerts-events-table", "t.includes('firing')"))
        wait_for(browser, text_of("#alerts-rules-table", f"t.includes('through step {event['step']} (firing)')"))
        assert browser.find_elements("id", "alerts-not-evaluated") == []
        assert "imbalance" in events and RUN in events
        wait_for(browser, graph_data("alerts-timeline", "data.length === 1 && data[0].name === 'firing'"))
        screenshot(browser, "alerts")
        assert severe_console_errors(browser) == []
        href = wait_for(browser, "const a = document.querySelector('#alerts-events-table a.event-link');"
                                 "return a && a.href;")
        assert f"balance?runs={RUN}&step_min=0&step_max={event['step'] + 50}" in href
        browser.get(href)  # the table redraws on each refresh, so follow the link by its address
        wait_for(browser, graph_data("balance-maxvio", "data.length === 1"))
        assert browser.find_element("id", "balance-step-max").get_attribute("value") == str(event["step"] + 50)

        # Deleting needs the token too; the rule and its events go.
        browser.get(f"{server.url}/dash/alerts?runs={RUN}")
        wait_for(browser, text_of("#alerts-rules-table", "t.includes('imbalance')"))
        browser.find_element("id", "alerts-token").send_keys(TOKEN)
        browser.find_element("css selector", "#alerts-rules-table button").click()
        wait_for(browser, text_of("#alerts-write-result", f"t.includes('deleted rule {rule['id']}')"))
        wait_for(browser, text_of("#alerts-rules", "t.includes('no alert rules yet')"))
        assert alerts.list_rules(recorded_store) == []
        assert severe_console_errors(browser) == []


def test_a_bad_rule_from_the_page_is_refused_with_its_reason(recorded_store, browser):
    with LiveServer(create_app(recorded_store, Settings(api_token=TOKEN), refresh_ms=60_000)) as server:
        browser.get(f"{server.url}/dash/alerts?rule=99999999999")
        wait_for(browser, text_of("#alerts-message", "t.includes('out of range')"))
        browser.get(f"{server.url}/dash/alerts?rule=gone")
        wait_for(browser, text_of("#alerts-message", "t.includes(\"no alert rule 'gone'\")"))
        browser.find_element("id", "alerts-new-name").send_keys("12345")
        type_into(browser, "alerts-new-threshold", "1")
        browser.find_element("id", "alerts-token").send_keys(TOKEN)
        browser.find_element("id", "alerts-create").click()
        wait_for(browser, text_of("#alerts-write-result", "t.includes('must not be all digits')"))
        assert alerts.list_rules(recorded_store) == []
        assert severe_console_errors(browser) == []
