"""The device routes: the recorded expert -> device map and per-device load, typed, equal to the metric."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from moescope.analysis import compute_metric
from moescope.dashboard import create_app
from moescope.settings import Settings

from .conftest import LAYERS, RUN, STEPS
from .device_runs import EP_RUN, add_ep_run
from .test_api_whatif import _same


@pytest.fixture
def client(recorded_store):
    add_ep_run(recorded_store)
    with TestClient(create_app(recorded_store, Settings(api_token=None))) as c:
        yield c


def test_the_recorded_map_is_served_and_a_run_without_one_is_404(client):
    res = client.get(f"/api/runs/{EP_RUN}/devices")
    assert res.status_code == 200, res.text
    assert res.json() == {"source": "given", "num_devices": 2,
                          "layers": {"0": [[0], [0], [1], [1]], "1": [[0], [1], [0, 1], [1]]}}
    missing = client.get(f"/api/runs/{RUN}/devices")
    assert missing.status_code == 404 and "recorded no expert -> device map" in missing.json()["detail"]
    assert client.get("/api/runs/no-such-run/devices").status_code == 404


@pytest.mark.parametrize("params, options", [
    ({}, {}),
    ({"by": "window"}, {"by": "window"}),
    ({"combine_layers": "true", "step_min": 1, "step_max": 3}, {"combine_layers": True, "steps": (1, 3)}),
    ({"layers": "1", "expert_devices": "0,1,1+0,1"}, {"layers": [1], "expert_devices": [[0], [1], [1, 0], [1]]}),
])
def test_device_load_equals_the_metric(client, recorded_store, params, options):
    res = client.get(f"/api/runs/{EP_RUN}/devices/load", params=params)
    assert res.status_code == 200, res.text
    _same(res.json(), compute_metric(recorded_store, "device_load", EP_RUN, **options))


def test_device_load_has_a_row_per_step_layer_and_device_summing_every_assignment(client):
    rows = client.get(f"/api/runs/{EP_RUN}/devices/load").json()
    assert len(rows) == STEPS * len(LAYERS) * 2
    assert sum(r["tokens"] for r in rows if r["step"] == 0 and r["layer"] == 1) == pytest.approx(32 * 2)
    assert all(0 < r["balancedness"] <= 1 and r["overload"] == pytest.approx(1 / r["balancedness"]) for r in rows)


def test_a_run_without_a_map_answers_400_unless_one_is_given(client):
    res = client.get(f"/api/runs/{RUN}/devices/load")
    assert res.status_code == 400 and "recorded no expert -> device map" in res.json()["detail"]
    given = client.get(f"/api/runs/{RUN}/devices/load", params={"ep_size": 2, "by": "window", "layers": "0"})
    assert given.status_code == 200 and [r["device"] for r in given.json()] == [0, 1]
    bad = client.get(f"/api/runs/{RUN}/devices/load", params={"expert_devices": "0,x"})
    assert bad.status_code == 400 and "expert_devices must be devices per expert" in bad.json()["detail"]


def test_openapi_names_every_device_load_column(client):
    spec = client.get("/openapi.json").json()
    ref = spec["paths"]["/api/runs/{run}/devices/load"]["get"]["responses"]["200"]["content"]["application/json"]
    row = spec["components"]["schemas"][ref["schema"]["items"]["$ref"].rsplit("/", 1)[1]]
    assert set(row["properties"]) == {"step", "layer", "device", "tokens", "balancedness", "overload", "steps",
                                      "overload_max"}
    assert all(prop.get("description") for prop in row["properties"].values())
