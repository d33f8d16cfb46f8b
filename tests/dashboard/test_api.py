"""The HTTP API over a recorded store: each route, and its 404 / 400 / 401 answers."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from moescope.analysis import METRICS, alerts, compute_metric
from moescope.dashboard import create_app
from moescope.settings import Settings

from .conftest import DEAD, E, K, LAYERS, POSITIONS, RUN, SEQS, STEPS

TOKEN = "s3cret-token"
ROUTING_ROWS = STEPS * len(LAYERS) * SEQS * POSITIONS * K


@pytest.fixture
def client(recorded_store):
    with TestClient(create_app(recorded_store, Settings(api_token=None))) as c:
        yield c


@pytest.fixture
def guarded(recorded_store):
    with TestClient(create_app(recorded_store, Settings(api_token=TOKEN))) as c:
        yield c


def test_list_runs_reports_frames_and_routing_rows(client):
    [run] = client.get("/api/runs").json()
    assert run["run"] == RUN and run["frames"] == STEPS and run["routing_rows"] == ROUTING_ROWS
    assert run["checkpoints"] == 2 and run["layers"] == len(LAYERS)


def test_checkpoints_layers_and_ledger_of_a_run(client):
    ckpts = client.get(f"/api/runs/{RUN}/checkpoints").json()
    assert [(c["checkpoint"], c["step"]) for c in ckpts] == [("ck-early", 0), ("ck-late", 3)]
    layers = client.get(f"/api/runs/{RUN}/layers").json()
    assert [(l["layer"], l["num_experts"], l["top_k"]) for l in layers] == [(x, E, K) for x in LAYERS]
    [ledger] = client.get(f"/api/runs/{RUN}/ledger").json()
    assert ledger["producer"] == "p0" and ledger["sent"] == ledger["stored"] == STEPS
    assert ledger["missing"] == 0 and ledger["closed"] is True


@pytest.mark.parametrize("path", ["checkpoints", "layers", "ledger", "metrics/maxvio"])
def test_unknown_run_is_404_with_one_line_message(client, path):
    resp = client.get(f"/api/runs/no-such-run/{path}")
    assert resp.status_code == 404
    detail = resp.json()["detail"]
    assert "no-such-run" in detail and "\n" not in detail and RUN in detail  # names the runs that do exist


def test_metric_records_match_compute_metric(client, recorded_store):
    got = client.get(f"/api/runs/{RUN}/metrics/load_share", params={"checkpoint": "ck-late", "by": "window"}).json()
    want = compute_metric(recorded_store, "load_share", run=RUN, checkpoint="ck-late", by="window")
    assert [(r["layer"], r["expert"]) for r in got] == list(zip(want.layer, want.expert))
    assert [r["share"] for r in got] == pytest.approx(list(want.share))
    dead_layer, dead_expert = next(iter(DEAD.items()))
    assert next(r["share"] for r in got if (r["layer"], r["expert"]) == (dead_layer, dead_expert)) == 0
    for layer in LAYERS:
        assert sum(r["share"] for r in got if r["layer"] == layer) == pytest.approx(1.0)


@pytest.mark.parametrize("layers", [{"layers": "1"}, {"layers": ["1"]}, {"layers": "1,"}])
def test_metric_layer_filter_accepts_comma_and_repeated_forms(client, layers):
    rows = client.get(f"/api/runs/{RUN}/metrics/maxvio", params=layers).json()
    assert rows and {r["layer"] for r in rows} == {1}
    both = client.get(f"/api/runs/{RUN}/metrics/maxvio", params={"layers": ["0", "1"]}).json()
    assert {r["layer"] for r in both} == {0, 1}


def test_metric_step_range_is_inclusive_and_open_ended(client):
    rows = client.get(f"/api/runs/{RUN}/metrics/entropy", params={"step_min": 1, "step_max": 2}).json()
    assert sorted({r["step"] for r in rows}) == [1, 2]
    tail = client.get(f"/api/runs/{RUN}/metrics/entropy", params={"step_min": 3}).json()
    assert sorted({r["step"] for r in tail}) == [3, 4]
    # List columns (expert ids) come back as JSON arrays.
    dead = client.get(f"/api/runs/{RUN}/metrics/dead_experts", params={"by": "window"}).json()
    assert {r["layer"]: r["dead_ids"] for r in dead} == {layer: ([DEAD[layer]] if layer in DEAD else []) for layer in LAYERS}


def test_bad_metric_name_is_400_listing_valid_names(client):
    resp = client.get(f"/api/runs/{RUN}/metrics/loadshare")
    assert resp.status_code == 400
    detail = resp.json()["detail"]
    assert "loadshare" in detail and all(name in detail for name in METRICS)


@pytest.mark.parametrize("params, words", [({"layers": "x"}, "layers"), ({"step_min": 4, "step_max": 1}, "lo <= hi")])
def test_bad_metric_arguments_are_400_naming_the_problem(client, params, words):
    resp = client.get(f"/api/runs/{RUN}/metrics/maxvio", params=params)
    assert resp.status_code == 400 and words in resp.json()["detail"]


RULE = {"name": "imbalance", "metric": "maxvio", "comparison": ">", "threshold": 0.1, "run": RUN, "window_steps": 5}


def test_alert_writes_need_the_bearer_token_when_one_is_configured(guarded):
    assert guarded.post("/api/alerts", json=RULE).status_code == 401
    wrong = guarded.post("/api/alerts", json=RULE, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert guarded.get("/api/alerts").json() == []  # nothing was written; reads stay open
    created = guarded.post("/api/alerts", json=RULE, headers={"Authorization": f"Bearer {TOKEN}"})
    assert created.status_code == 201 and created.json()["name"] == "imbalance"
    assert guarded.delete("/api/alerts/imbalance").status_code == 401
    assert [r["name"] for r in guarded.get("/api/alerts").json()] == ["imbalance"]


def test_alert_rule_create_read_delete(client):
    rule = client.post("/api/alerts", json=RULE).json()
    assert rule["scope"] == "run" and rule["threshold"] == 0.1
    assert client.get(f"/api/alerts/{rule['id']}").json()["name"] == "imbalance"
    assert client.get("/api/alerts/imbalance").json()["id"] == rule["id"]
    assert client.post("/api/alerts", json=RULE).status_code == 400  # duplicate name
    assert client.delete("/api/alerts/imbalance").status_code == 204
    assert client.get("/api/alerts/imbalance").status_code == 404
    assert client.delete("/api/alerts/imbalance").status_code == 404


@pytest.mark.parametrize("change, words", [({"metric": "nonsense"}, "nonsense"), ({"comparison": "=="}, "comparison"),
                                           ({"window_steps": 0}, "window_steps")])
def test_bad_alert_rule_is_rejected_naming_the_field(client, change, words):
    resp = client.post("/api/alerts", json={**RULE, **change})
    assert resp.status_code in (400, 422) and words in resp.text


def test_firing_alert_shows_in_events_and_prometheus(client, recorded_store):
    client.post("/api/alerts", json=RULE)
    [event] = alerts.evaluate_alerts(recorded_store)
    assert event["state"] == "firing"
    events = client.get("/api/alerts/events", params={"run": RUN}).json()
    assert [(e["rule_id"], e["state"]) for e in events] == [(event["rule_id"], "firing")]
    assert client.get("/api/alerts/events", params={"run": "other"}).json() == []
    text = client.get("/metrics").text
    assert f'moescope_alerts_firing{{layer="",rule="imbalance",run="{RUN}"}} 1.0' in text
    assert "moescope_alerts_firing_pairs 1.0" in text


def test_prometheus_exposition_counts_frames_and_rows_per_run(client):
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    lines = resp.text.splitlines()
    assert f'moescope_ingest_frames_total{{run="{RUN}"}} {STEPS}.0' in lines
    assert f'moescope_routing_rows_total{{run="{RUN}"}} {ROUTING_ROWS}.0' in lines
    assert "# TYPE moescope_ingest_frames_total counter" in lines
    assert "moescope_alerts_firing_pairs 0.0" in lines
    # Every sample line belongs to a declared family.
    families = {line.split()[2] for line in lines if line.startswith("# TYPE")}
    assert all(line.split("{")[0].split()[0] in families for line in lines if not line.startswith("#"))


def test_healthz_and_root_redirect_to_dashboard(client):
    assert client.get("/healthz").json() == {"status": "ok", "store": str(client.app.state.store.root), "runs": 1}
    resp = client.get("/", follow_redirects=False)
    assert resp.status_code == 307 and resp.headers["location"] == "/dash/"
    page = client.get("/dash/")
    assert page.status_code == 200 and "<title>moescope</title>" in page.text
    # Dash's own endpoints answer under the mount prefix; the shell holds the menu and the page container.
    layout = client.get("/dash/_dash-layout").text
    for element in ("nav-runs", "nav-balance", "_pages_content", "refresh"):
        assert f'"{element}"' in layout


def test_openapi_documents_each_api_operation(client):
    spec = client.get("/openapi.json").json()
    ops = {(path, method): op for path, methods in spec["paths"].items() for method, op in methods.items()}
    assert ("/api/runs/{run}/metrics/{name}", "get") in ops and ("/api/alerts/{rule}", "delete") in ops
    for (path, _), op in ops.items():
        assert op.get("description"), f"{path} has no docstring"
