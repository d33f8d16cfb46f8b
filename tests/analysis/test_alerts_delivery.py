"""Webhook delivery: URLs checked with a real parser, one bad webhook never stops the others,
undelivered events retried at later evaluations (bounded, counted), allowed hosts enforced at delivery."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from moescope.analysis import alerts  # noqa: E402
from moescope.settings import Settings  # noqa: E402
from test_alerts import _write_step, hook, hook_server  # noqa: E402,F401 - loopback receiver, one recorded step

CRLF_HOOK = "http://127.0.0.1:9/x\r\nX-Injected: 1"


def _stored_rule(store, name, webhook):
    """A rule written straight through the store, as one created before webhook URLs were parsed."""
    rid = store.insert_alert_rule(dict(name=name, metric="dead_experts", run=None, layer=None, expert=None,
                                       comparison=">", threshold=0.0, aggregation="window", window_steps=1,
                                       ema_alpha=None, for_evaluations=1, webhook=webhook, enabled=True, created_at=0.0))
    return rid


@pytest.mark.parametrize("url, words", [
    (CRLF_HOOK, "control character"), ("http://h/a b", "space"), ("http://h/\x7f", "control character"),
    ("http://h/\u200b", "control character"), ("ftp://h/x", "scheme 'ftp'"), ("javascript:alert(1)", "scheme"),
    ("http://user:pw@h/x", "credentials"), ("http://@h/x", "credentials"), ("http:///x", "no host"),
    ("http://h:70000/x", "port"), ("http://h:abc/x", "port"), ("http://[::1/x", "invalid"), ("", "URL string"),
    ("http://" + "a" * 3000, "2000"),
])
def test_webhook_urls_are_parsed_and_refused_with_the_reason(url, words):
    with pytest.raises(ValueError, match=words) as info:
        alerts.check_webhook(url)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("url", ["https://hooks.slack.com/services/T/B/x", "http://127.0.0.1:8080/h?x=1",
                                 "http://[::1]:9000/h", "HTTPS://Example.COM/"])
def test_ordinary_webhook_urls_pass(url):
    assert alerts.check_webhook(url) == url


def test_allowed_hosts_are_globs_on_the_host_name():
    allowed = ["hooks.slack.com", "*.corp.example"]
    assert alerts.check_webhook("https://HOOKS.slack.com/x", allowed)
    assert alerts.check_webhook("https://alerts.corp.example:8443/x", allowed)
    for url in ("https://corp.example/x", "https://hooks.slack.com.evil.example/x", "http://127.0.0.1/x"):
        with pytest.raises(ValueError, match="not in webhook_allowed_hosts"):
            alerts.check_webhook(url, allowed)


@pytest.mark.parametrize("url, shown", [
    ("https://hooks.slack.com/services/T/B/SECRET", "https://hooks.slack.com/***"),
    ("http://127.0.0.1:8080/x?token=SECRET", "http://127.0.0.1:8080/***"), ("http://[::1]:9/x", "http://[::1]:9/***"),
    ("http://h:99999/x", "***"), (None, None)])
def test_masked_webhooks_keep_scheme_and_host_only(url, shown):
    assert alerts.mask_webhook(url) == shown


def test_a_webhook_with_crlf_cannot_stop_evaluation_or_the_other_deliveries(store, hook):
    url, received = hook
    _write_step(store, 0, collapsed=True)
    _stored_rule(store, "a-bad", CRLF_HOOK)
    _stored_rule(store, "b-good", url)
    before = alerts.NOTIFY_STATS["failed"]
    events = alerts.evaluate_alerts(store)
    assert sorted((e["rule"], e["notified"]) for e in events) == [("a-bad", False), ("b-good", True)]
    assert [b["rule"] for b in received] == ["b-good"]
    assert alerts.NOTIFY_STATS["failed"] == before + 1
    _write_step(store, 1, collapsed=False)
    resolved = alerts.evaluate_alerts(store)  # later events of both rules are still evaluated and sent
    assert sorted(e["rule"] for e in resolved) == ["a-bad", "b-good"]
    assert [(b["rule"], b["state"]) for b in received] == [("b-good", "firing"), ("b-good", "resolved")]


def test_an_undelivered_event_is_retried_at_the_next_evaluation(store, hook_server):
    hook_server.answers[:] = [503, 500]
    _write_step(store, 0, collapsed=True)
    alerts.add_rule(store, "dead", "dead_experts", ">", 0, window_steps=1, webhook=hook_server.url)
    [event] = alerts.evaluate_alerts(store)
    assert event["notified"] is False
    assert alerts.evaluate_alerts(store) == []  # no new step; the retry fails again (500)
    assert alerts.list_events(store)[0]["attempts"] == 2 and alerts.list_events(store)[0]["notified"] is False
    alerts.evaluate_alerts(store)  # third try: 204
    [stored] = alerts.list_events(store)
    assert stored["notified"] is True and stored["attempts"] == 3
    assert [b["attempt"] for b in hook_server.received] == [1, 2, 3]
    assert {b["id"] for b in hook_server.received} == {event["id"]}
    alerts.evaluate_alerts(store)
    assert len(hook_server.received) == 3  # delivered events are not sent again


def test_after_a_failure_later_events_to_that_webhook_wait_and_then_arrive_in_order(store, hook_server):
    hook_server.answers[:] = [500, 500]
    _write_step(store, 0, collapsed=True)
    alerts.add_rule(store, "dead", "dead_experts", ">", 0, window_steps=1, webhook=hook_server.url)
    alerts.evaluate_alerts(store)  # firing: attempt 1 fails
    _write_step(store, 1, collapsed=False)
    [resolved] = alerts.evaluate_alerts(store)  # firing's attempt 2 fails; resolved waits untried
    assert resolved["notified"] is False and alerts.list_events(store)[0]["attempts"] == 0
    alerts.evaluate_alerts(store)
    assert [(b["state"], b["attempt"]) for b in hook_server.received] == [
        ("firing", 1), ("firing", 2), ("firing", 3), ("resolved", 1)]
    assert all(e["notified"] for e in alerts.list_events(store))


def test_retries_stop_after_the_bounded_number_of_attempts(store, hook_server):
    hook_server.answers[:] = [500] * 100
    _write_step(store, 0, collapsed=True)
    alerts.add_rule(store, "dead", "dead_experts", ">", 0, window_steps=1, webhook=hook_server.url)
    for _ in range(alerts.DELIVERY_ATTEMPTS + 3):
        alerts.evaluate_alerts(store)
    assert len(hook_server.received) == alerts.DELIVERY_ATTEMPTS
    [stored] = alerts.list_events(store)
    assert stored["attempts"] == alerts.DELIVERY_ATTEMPTS and stored["notified"] is False


def test_allowed_hosts_are_enforced_at_delivery_too(store, hook):
    url, received = hook
    _write_step(store, 0, collapsed=True)
    alerts.add_rule(store, "dead", "dead_experts", ">", 0, window_steps=1, webhook=url)  # allowed when created
    restricted = Settings(webhook_allowed_hosts=["hooks.example.com"])
    [event] = alerts.evaluate_alerts(store, settings=restricted)
    assert event["notified"] is False and received == []
    with pytest.raises(ValueError, match="webhook_allowed_hosts"):
        alerts.add_rule(store, "other", "cv", ">", 1.0, webhook=url, settings=restricted)
