"""`moescope serve --evaluate-alerts`: the server evaluates the rules itself where no beat runs."""
from __future__ import annotations

import time

import pytest

from moescope.analysis import alerts
from moescope.dashboard.alert_loop import AlertLoop

from .conftest import RUN, STEPS


def _until(predicate, timeout: float = 60.0):
    """Poll for a behaviour, however slow the machine; the deadline only ends a hung test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError("the alert loop did not get there")


def test_the_loop_fires_a_rule_and_stops_cleanly(recorded_store):
    rule = alerts.add_rule(recorded_store, name="imbalance", metric="maxvio", comparison=">", threshold=0.1, run=RUN,
                           window_steps=STEPS)
    loop = AlertLoop(recorded_store, interval=0.05).start()
    try:
        [event] = _until(lambda: alerts.list_events(recorded_store, run=RUN))
        _until(lambda: loop.rounds >= 3)  # later rounds find no new step and add nothing
    finally:
        loop.stop()
    assert event["state"] == "firing" and event["rule_id"] == rule["id"] and loop.failures == 0
    assert len(alerts.list_events(recorded_store, run=RUN)) == 1
    assert recorded_store.alert_state(rule["id"], RUN)["last_step"] == STEPS - 1
    assert not loop._thread.is_alive()


def test_a_loop_beside_another_evaluator_records_each_event_once(recorded_store):
    alerts.add_rule(recorded_store, name="imbalance", metric="maxvio", comparison=">", threshold=0.1, run=RUN,
                    window_steps=STEPS)
    loop = AlertLoop(recorded_store, interval=0.01).start()
    try:
        for _ in range(20):  # beat (or `moescope alerts evaluate`) taking turns with the server's loop
            alerts.evaluate_alerts(recorded_store)
        _until(lambda: loop.rounds >= 3)
    finally:
        loop.stop()
    assert [e["state"] for e in alerts.list_events(recorded_store, run=RUN)] == ["firing"]


def test_a_failing_round_is_counted_and_the_loop_goes_on(recorded_store, monkeypatch):
    calls = []

    def flaky(store, settings=None):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("store unreachable")
        return []

    monkeypatch.setattr(alerts, "evaluate_alerts", flaky)
    loop = AlertLoop(recorded_store, interval=0.01).start()
    try:
        _until(lambda: len(calls) >= 3)
    finally:
        loop.stop()
    assert loop.failures == 1


@pytest.mark.parametrize("interval", [0, -1.0])
def test_a_non_positive_interval_is_refused(recorded_store, interval):
    with pytest.raises(ValueError, match="alert_interval_s must be positive"):
        AlertLoop(recorded_store, interval=interval)
