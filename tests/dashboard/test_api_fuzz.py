"""Schemathesis over the whole API, from its own OpenAPI document, with and without a token: no server errors,
and no write goes through without the token."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from moescope.dashboard import create_app
from moescope.settings import Settings

TOKEN = "fuzz-token"
WRITES = {"POST", "PUT", "PATCH", "DELETE"}


def _operations(app):
    import schemathesis

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("token", [None, TOKEN], ids=["no-token", "token"])
def test_no_operation_of_the_api_answers_with_a_server_error(recorded_store, token):
    from hypothesis import HealthCheck, given, settings

    app = create_app(recorded_store, Settings(api_token=token))
    operations = _operations(app)
    assert len(operations) > 10
    headers = {"Authorization": f"Bearer {token}"} if token else None
    for operation in operations:
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(operation.as_strategy())
        def check(case):
            resp = case.call(headers=headers)
            assert resp.status_code < 500, (case.method, case.formatted_path, case.query, case.body, resp.text[:500])

        check()


def test_every_write_without_the_token_is_refused_with_401(recorded_store):
    app = create_app(recorded_store, Settings(api_token=TOKEN))
    writes = [op for op in _operations(app) if op.method.upper() in WRITES]
    assert writes, "the API has write operations"
    with TestClient(app) as client:
        for op in writes:
            path = op.path.replace("{rule}", "some-rule").replace("{run}", "r")
            for path_param in [p for p in path.split("/") if p.startswith("{")]:
                path = path.replace(path_param, "x")
            resp = client.request(op.method.upper(), path, json={})
            assert resp.status_code == 401, (op.method, op.path, resp.status_code, resp.text[:200])
