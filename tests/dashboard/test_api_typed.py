"""Typed API: the OpenAPI document names each route's columns, the answers keep to them, the docs
pages load only local assets, and schemathesis finds no server error on a recorded run."""
from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from moescope.analysis import METRICS
from moescope.dashboard import create_app
from moescope.dashboard.api.models import METRIC_COLUMNS, RunHealth
from moescope.settings import Settings

from .conftest import RUN


@pytest.fixture
def client(recorded_store):
    with TestClient(create_app(recorded_store, Settings(api_token=None))) as c:
        yield c


def _row_schema(spec: dict, path: str) -> dict:
    ref = spec["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]["items"]["$ref"]
    return spec["components"]["schemas"][ref.rsplit("/", 1)[1]]


def test_openapi_names_the_columns_of_every_metric_and_of_run_health(client):
    spec = client.get("/openapi.json").json()
    for metric, columns in METRIC_COLUMNS.items():
        row = _row_schema(spec, f"/api/runs/{{run}}/metrics/{metric}")
        assert set(row["properties"]) == set(columns), metric
        assert all(prop.get("description") for prop in row["properties"].values()), metric
    health = _row_schema(spec, "/api/runs/health")
    assert set(health["properties"]) == set(RunHealth.model_fields)


@pytest.mark.parametrize("metric", sorted(set(METRIC_COLUMNS) & set(METRICS)))
@pytest.mark.parametrize("by", ["step", "window"])
def test_metric_answers_keep_to_their_documented_columns(client, metric, by):
    resp = client.get(f"/api/runs/{RUN}/metrics/{metric}", params={"by": by})
    if resp.status_code == 400:  # drift metrics need replayed probe sets, which this run has none of
        assert metric in ("saturation", "fluctuation", "load_js", "alignment"), resp.text
        return
    assert resp.status_code == 200, resp.text
    rows = resp.json()
    if not rows:  # no token id reaches the default min_count of 10 in this small run
        assert metric == "vocab_specialisation", f"{metric} by {by} returned no rows"
        return
    assert set(rows[0]) <= set(METRIC_COLUMNS[metric]), set(rows[0]) - set(METRIC_COLUMNS[metric])


def test_run_health_route_answers_what_the_runs_page_shows(client):
    [row] = client.get("/api/runs/health").json()
    assert row["run"] == RUN and row["dead_experts"] == 1 and row["status"] == "recording"
    assert row["experts"] == sum(layer["num_experts"] for layer in client.get(f"/api/runs/{RUN}/layers").json())


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_local_assets(client, page):
    html = client.get(page)
    assert html.status_code == 200
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html.text)
    urls += re.findall(r"""url:\s*['"]([^'"]+)['"]""", html.text)  # the OpenAPI document Swagger UI fetches
    assert urls and all(u.startswith("/") and not u.startswith("//") for u in urls), urls
    assert "cdn" not in html.text.lower() and "googleapis" not in html.text
    for url in set(urls):
        assert client.get(url).status_code == 200, url


def test_schemathesis_finds_no_server_error_on_a_recorded_runs_routes(recorded_store):
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    app = create_app(recorded_store, Settings(api_token=None))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app).include(path_regex="^/api/runs")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > len(METRIC_COLUMNS)
    for operation in operations:
        @settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(operation.as_strategy())
        def check(case):
            if "run" in (case.path_parameters or {}):
                case.path_parameters["run"] = RUN  # a recorded run, so the metric code itself is exercised
            resp = case.call()
            assert resp.status_code < 500, (case.method, case.formatted_path, case.query, resp.text[:500])

        check()
