"""With a broker, a scenario's training is recorded through Redis into `moescope worker`s, not the local sink."""
import sys
from pathlib import Path

import pytest

from moescope.analysis.store import AnalysisStore as Store
from moescope.scenarios import specialisation
from moescope.scenarios.report import Context
from moescope.scenarios.training import Recorder

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "collector"))
from ingest_helpers import RedisServer, Workers, redis_available  # noqa: E402
from scenario_helpers import TINY  # noqa: E402


@pytest.fixture
def broker_and_worker(tmp_path):
    if not redis_available():
        pytest.skip("redis-server binary not on PATH")
    server = RedisServer(tmp_path / "redis").start()
    pool = Workers(server.url, tmp_path / "store", None, tmp_path / "logs")
    pool.start()
    yield server.url, pool
    pool.stop_all()
    server.stop()


def test_scenario_through_a_broker_lands_in_the_workers_store(tmp_path, broker_and_worker):
    url, pool = broker_and_worker
    store = Store(tmp_path / "store")
    ctx = Context(recorder=Recorder(store, broker=url), steps=4, seed=0, prefix="via-redis")
    report = specialisation.run(ctx, setup=TINY)
    run = report.runs[0]
    ledger = store.ledger(run)
    assert int(ledger.missing.sum()) == 0 and int(ledger.stored.sum()) == int(ledger.sent.sum()) > 0, pool.logs()
    assert all(p.startswith("scenario-") for p in ledger.producer)  # the scenario's own producers, via the stream
    steps = store.sql("SELECT DISTINCT step FROM expert_step WHERE phase = 'train' ORDER BY 1", run=run).step.tolist()
    assert steps == [1, 2, 3, 4]
