"""The alerts API under hostile input: 4xx with a reason (never a 500), unambiguous addressing,
webhook URLs hidden from readers without the token, a rule's evaluated series."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from moescope.analysis import alerts
from moescope.dashboard import create_app
from moescope.settings import Settings

from .conftest import LAYERS, RUN, STEPS
from .test_api import TOKEN, client, guarded  # noqa: F401 - the same app fixtures, with and without a token

AUTH = {"Authorization": f"Bearer {TOKEN}"}
RULE = {"name": "imbalance", "metric": "maxvio", "comparison": ">", "threshold": 0.1, "run": RUN, "window_steps": 5}
HOOK = "https://hooks.example.com/services/T000/B000/XXXXSECRET"
BIG = 2**63 + 7


@pytest.mark.parametrize("path", ["²", "١٢", str(BIG), "9" * 40, "-1"])
def test_odd_rule_ids_are_a_clear_4xx_never_a_server_error(client, path):
    client.post("/api/alerts", json=RULE)
    for method in (client.get, client.delete):
        resp = method(f"/api/alerts/{path}")
        assert 400 <= resp.status_code < 500, (method, path, resp.status_code)
        assert path in resp.json()["detail"] or "rule id" in resp.json()["detail"]


@pytest.mark.parametrize("rule_id", ["²", str(BIG), "-3"])
def test_events_filter_with_an_odd_rule_id_is_a_4xx(client, rule_id):
    resp = client.get("/api/alerts/events", params={"rule_id": rule_id})
    assert 400 <= resp.status_code < 500


def test_events_filter_with_a_bad_run_id_is_400_naming_it(client):
    resp = client.get("/api/alerts/events", params={"run": "bad\x00run"})
    assert resp.status_code == 400 and "invalid run id" in resp.json()["detail"]


@pytest.mark.parametrize("change, words", [
    ({"layer": BIG}, "layer"), ({"expert": BIG, "layer": 0}, "expert"), ({"window_steps": BIG}, "window_steps"),
    ({"for_evaluations": BIG}, "for_evaluations"), ({"threshold": "NaN"}, "threshold"),
    ({"layer": -1}, "layer"), ({"name": "4"}, "digits"), ({"name": "²³"}, "digits"), ({"name": "a\nb"}, "name"),
    ({"run": "no-such-run"}, "unknown run"), ({"layer": 7}, "layer 7"), ({"layer": 1, "expert": 9}, "expert 9"),
    ({"webhook": "http://hooks.example.com/a\r\nX-Injected: 1"}, "webhook"),
    ({"webhook": "http://user:pw@hooks.example.com/x"}, "credentials"),
    ({"webhook": "http:///nohost"}, "host"), ({"webhook": "http://h:99999/"}, "port"),
    ({"aggregation": "median"}, "aggregation"), ({"aggregation": "ema"}, "ema"),
    ({"aggregation": "ema", "ema_alpha": 1.5}, "ema_alpha"), ({"aggregation": "step", "ema_span": 3}, "ema"),
])
def test_bad_rule_bodies_are_4xx_naming_the_field(client, change, words):
    body = {**RULE, **change}
    if "aggregation" in change:
        del body["window_steps"]  # a window length belongs to aggregation "window" only
    resp = client.post("/api/alerts", json=body)
    assert resp.status_code in (400, 422), resp.text
    assert words in resp.text
    assert client.get("/api/alerts").json() == []


@pytest.mark.parametrize("raw", ["1e400", "-1e999", "1" + "0" * 400])
def test_a_threshold_beyond_double_range_is_400_naming_it(client, raw):
    body = '{"name": "x", "metric": "maxvio", "threshold": %s}' % raw
    resp = client.post("/api/alerts", content=body, headers={"Content-Type": "application/json"})
    assert resp.status_code in (400, 422) and "threshold" in resp.text


def test_a_rule_named_like_another_rules_id_cannot_exist_so_delete_by_number_is_unambiguous(client):
    first = client.post("/api/alerts", json=RULE).json()
    resp = client.post("/api/alerts", json={**RULE, "name": str(first["id"] + 1)})
    assert resp.status_code == 400 and "digits" in resp.json()["detail"]
    second = client.post("/api/alerts", json={**RULE, "name": "other"}).json()
    assert client.delete(f"/api/alerts/{second['id']}").status_code == 204
    assert [r["name"] for r in client.get("/api/alerts").json()] == ["imbalance"]


def test_webhook_urls_are_masked_for_readers_without_the_token(guarded):
    created = guarded.post("/api/alerts", json={**RULE, "webhook": HOOK}, headers=AUTH)
    assert created.status_code == 201 and created.json()["webhook"] == HOOK
    for path in ("/api/alerts", "/api/alerts/imbalance", f"/api/alerts/{created.json()['id']}"):
        anonymous = guarded.get(path).text
        assert "SECRET" not in anonymous and "hooks.example.com" in anonymous, path
        wrong = guarded.get(path, headers={"Authorization": "Bearer nope"}).text
        assert "SECRET" not in wrong
        assert HOOK in guarded.get(path, headers=AUTH).text
    assert alerts.mask_webhook(HOOK) == "https://hooks.example.com/***"


def test_webhook_hosts_outside_the_allowed_list_are_refused(recorded_store):
    settings = Settings(api_token=None, webhook_allowed_hosts=["hooks.example.com", "*.internal.example"])
    with TestClient(create_app(recorded_store, settings)) as c:
        assert c.post("/api/alerts", json={**RULE, "webhook": HOOK}).status_code == 201
        ok = c.post("/api/alerts", json={**RULE, "name": "b", "webhook": "https://a.internal.example/x"})
        assert ok.status_code == 201
        resp = c.post("/api/alerts", json={**RULE, "name": "c", "webhook": "http://127.0.0.1:9/x"})
        assert resp.status_code == 400 and "webhook_allowed_hosts" in resp.json()["detail"]


def test_rule_series_route_returns_the_evaluated_series_with_its_threshold(client, recorded_store):
    client.post("/api/alerts", json={**RULE, "aggregation": "step", "window_steps": None})
    rows = client.get("/api/alerts/imbalance/series", params={"run": RUN}).json()
    assert [r["step"] for r in rows] == list(range(STEPS))
    assert all(r["threshold"] == 0.1 for r in rows)
    want = recorded_store.metric("maxvio", run=RUN, by="step")
    per_step = want.groupby("step")["maxvio"].mean()
    assert [r["value"] for r in rows] == pytest.approx(list(per_step))
    assert client.get("/api/alerts/imbalance/series", params={"run": "nope"}).status_code == 404
    assert client.get("/api/alerts/imbalance/series", params={"run": "bad\x00run"}).status_code == 400
    assert client.get("/api/alerts/imbalance/replay", params={"run": RUN}).status_code == 200
    assert client.get("/api/alerts/a%00b").status_code == 404
    assert client.get("/api/alerts/nope/series", params={"run": RUN}).status_code == 404
    assert len(LAYERS) == 2


def test_schemathesis_finds_no_server_error_in_the_alerts_api(recorded_store):
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    for token in (None, TOKEN):
        app = create_app(recorded_store, Settings(api_token=token))
        schema = schemathesis.openapi.from_asgi("/openapi.json", app).include(path_regex="^/api/alerts")
        for result in schema.get_all_operations():
            operation = result.ok()

            @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
            @given(operation.as_strategy())
            def check(case):
                resp = case.call(headers=AUTH if token else None)
                assert resp.status_code < 500, (case.method, case.formatted_path, case.query, case.body, resp.text)

            check()
