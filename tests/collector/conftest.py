"""Fixtures for the ingest tests: an own Redis per test, worker subprocesses, store backends."""
from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from ingest_helpers import RedisServer, Workers, redis_available  # noqa: E402


@pytest.fixture
def redis_server(tmp_path):
    if not redis_available():
        pytest.skip("redis-server binary not on PATH")
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request):
    """None (SQLite file in the store) or a PostgreSQL URL scoped to a fresh schema, dropped afterwards."""
    return None if request.param == "sqlite" else request.getfixturevalue("postgres_schema_url")


@pytest.fixture
def postgres_schema_url(postgres_url):
    """A PostgreSQL URL scoped to a fresh schema, dropped afterwards (skips when PostgreSQL is not reachable)."""
    from sqlalchemy import create_engine, text

    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres_url)
    try:
        with admin.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"PostgreSQL not reachable at {postgres_url}: {exc}")
    admin.dispose()
    yield f"{postgres_url}?options=-csearch_path%3D{schema}"
    admin = create_engine(postgres_url, pool_pre_ping=True)  # a test may have restarted the server
    with admin.begin() as conn:
        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


@pytest.fixture
def workers(tmp_path, redis_server, database_url):
    pool = Workers(redis_server.url, tmp_path / "store", database_url, tmp_path / "logs")
    yield pool
    pool.stop_all()
