"""The what-if routes: placement (per layer and per device) and expert cache, typed, with their 400 / 404 answers."""
from __future__ import annotations

import math

import pytest
from fastapi.testclient import TestClient

from moescope.analysis import compute_metric
from moescope.dashboard import create_app
from moescope.settings import Settings

from .conftest import E, LAYERS, RUN, STEPS


@pytest.fixture
def client(recorded_store):
    with TestClient(create_app(recorded_store, Settings(api_token=None))) as c:
        yield c


def _same(api_rows, df):
    assert len(api_rows) == len(df)
    for got, want in zip(api_rows, df.to_dict("records")):
        for key, value in want.items():
            if isinstance(value, float) and math.isnan(value):
                assert got[key] is None, key
            elif isinstance(value, float):
                assert got[key] == pytest.approx(value), key
            else:
                assert got[key] == (value.tolist() if hasattr(value, "tolist") else value), key


def test_placement_summary_equals_the_metric_with_its_suggested_map(client, recorded_store):
    params = {"ep_size": 2, "policy": ["contiguous", "eplb", "coactivation"], "fit_step_min": 0, "fit_step_max": 2,
              "step_min": 3, "step_max": 4, "hidden_size": 64, "dtype": "fp16"}
    res = client.get(f"/api/runs/{RUN}/whatif/placement", params=params)
    assert res.status_code == 200, res.text
    rows = res.json()
    want = compute_metric(recorded_store, "placement", RUN, ep_size=2, policy=["contiguous", "eplb", "coactivation"],
                          fit_steps=(0, 2), steps=(3, 4), hidden_size=64, dtype="fp16", by="window")
    _same(rows, want)
    assert {r["policy"] for r in rows} == {"contiguous", "eplb", "coactivation"}
    for layer in LAYERS:
        suggested = [r for r in rows if r["layer"] == layer and r["suggested"]]
        assert len(suggested) == 1 and suggested[0]["policy"] != "contiguous"
        assert sorted(x for d in suggested[0]["placement"] for x in d) == list(range(E))


def test_placement_devices_has_a_row_per_step_layer_and_device(client):
    rows = client.get(f"/api/runs/{RUN}/whatif/placement/devices", params={"ep_size": 4}).json()
    assert len(rows) == STEPS * len(LAYERS) * 4
    assert all(r["bytes_sent"] is None for r in rows)  # no hidden_size: copies only
    assert sum(r["tokens"] for r in rows if r["step"] == 0 and r["layer"] == 0) == 32 * 2


def test_cache_route_equals_the_metric(client, recorded_store):
    res = client.get(f"/api/runs/{RUN}/whatif/cache", params={"cache_sizes": [1, 3], "layers": "1"})
    assert res.status_code == 200, res.text
    _same(res.json(), compute_metric(recorded_store, "expert_cache", RUN, layers=[1], cache_sizes=[1, 3]))
    per_step = client.get(f"/api/runs/{RUN}/whatif/cache", params={"by": "step", "phase": "train"}).json()
    assert {r["step"] for r in per_step} == set(range(STEPS))


@pytest.mark.parametrize("path, params, status, fragment", [
    ("placement", {"ep_size": 3}, 400, "do not divide over ep_size 3"),
    ("placement", {"expert_map": "0,1,x"}, 400, "expert_map must be devices per expert"),
    ("placement", {"policy": "best"}, 422, ""),
    ("placement/devices", {"step_min": 100}, 400, "no expert_step rows"),
    ("placement", {"phase": "decode"}, 400, "no expert_step rows"),
    ("cache", {"cache_sizes": 0}, 400, "cache_sizes must be a list of positive ints"),
])
def test_bad_what_if_options_answer_with_the_reason(client, path, params, status, fragment):
    res = client.get(f"/api/runs/{RUN}/whatif/{path}", params=params)
    assert res.status_code == status
    assert fragment in str(res.json()["detail"])


def test_unknown_run_is_404(client):
    assert client.get("/api/runs/nope/whatif/placement").status_code == 404
    assert client.get("/api/runs/nope/whatif/cache").status_code == 404


def test_schemathesis_finds_no_server_error_in_the_whatif_api(recorded_store):
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    app = create_app(recorded_store, Settings(api_token=None))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app).include(path_regex="whatif")
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(operation.as_strategy())
        def check(case):
            case.path_parameters = {"run": RUN}
            resp = case.call()
            assert resp.status_code < 500, (case.formatted_path, case.query, resp.text)

        check()
