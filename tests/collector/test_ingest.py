"""probe frames -> RedisSink -> Redis stream -> Celery worker -> store, on SQLite and PostgreSQL."""
from __future__ import annotations

import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).parent))
from ingest_helpers import make_frame  # noqa: E402

from moescope.collector.check import check_run
from moescope.analysis.store import AnalysisStore as Store
from moescope.probe.redis_sink import RedisSink


def open_store(tmp_path, database_url):
    return Store(tmp_path / "store", database_url)


def test_every_frame_sent_through_redis_is_stored_once_and_acknowledged(tmp_path, redis_server, workers, database_url):
    workers.start()
    sink = RedisSink(redis_server.url, spool_dir=tmp_path / "spool", ack_poll_s=0.1, close_timeout_s=60)
    for seq in range(20):
        sink.send(make_frame("e2e", "p0", seq, n=500, final=seq == 19))
    sink.close()
    assert sink.unacked == [], workers.logs()
    assert sink.stats["acked"] == 20 and sink.stats["dropped"] == 0
    assert not list((tmp_path / "spool").rglob("*.frame"))  # acknowledged frames leave the spool
    store = open_store(tmp_path, database_url)
    ledger = store.ledger("e2e")
    assert ledger[["sent", "stored", "missing", "dropped"]].values.tolist() == [[20, 20, 0, 0]]
    assert store.sql("SELECT count(*) AS n FROM routing", run="e2e").n[0] == 20 * 500
    assert store.layers("e2e").module_path.tolist() == ["layers.0.mlp.gate", "layers.1.mlp.gate"]
    text, code = check_run(store, "e2e")
    assert code == 0 and "p0" in text
    store.close()
