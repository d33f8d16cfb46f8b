"""Faults during ingest: kill -9 of a worker, Redis restarting empty, PostgreSQL restarting."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).parent))
from ingest_helpers import make_frame, wait_until  # noqa: E402

from moescope.analysis.store import AnalysisStore as Store
from moescope.collector.stream import GROUP
from moescope.probe.redis_sink import RedisSink


def stored_frames(store: Store, run: str) -> int:
    try:
        return int(store.ledger(run).stored.sum())
    except Exception:  # noqa: BLE001 - run not registered yet
        return 0


def assert_exactly_once(store: Store, run: str, frames: int, rows_per_frame: int) -> None:
    ledger = store.ledger(run)
    assert ledger[["sent", "stored", "missing", "dropped", "dead_lettered"]].values.tolist() == [[frames, frames, 0, 0, 0]]
    # Row count equal to what was sent: nothing lost, nothing written twice.
    assert store.sql("SELECT count(*) AS n FROM routing", run=run).n[0] == frames * rows_per_frame
    assert store.sql("SELECT count(DISTINCT step) AS n FROM expert_step", run=run).n[0] == frames


def test_kill_9_of_a_worker_mid_ingest_loses_and_duplicates_nothing(tmp_path, redis_server, workers, database_url):
    frames, rows = 60, 20_000
    sink = RedisSink(redis_server.url, spool_dir=tmp_path / "spool", ack_poll_s=0.1, resend_after_s=600, close_timeout_s=120)
    for seq in range(frames):  # a backlog, so the worker is always inside a message
        sink.send(make_frame("k9", "p0", seq, n=rows, final=seq == frames - 1))
    assert sink.flush(30)
    first = workers.start()
    store = Store(tmp_path / "store", database_url)
    wait_until(lambda: stored_frames(store, "k9") >= 5, 60, what="the first frames to be stored")
    workers.kill9(first)
    pending = redis_server.client().xpending(sink.stream, GROUP)["pending"]
    workers.start()
    assert sink.wait_acked(120), workers.logs()
    sink.close()
    assert sink.unacked == []
    # Whatever the dead consumer held (a frame mid-write, or nothing) was claimed and stored once.
    assert pending <= 1 and redis_server.client().xpending(sink.stream, GROUP)["pending"] == 0
    assert_exactly_once(store, "k9", frames, rows)
    store.close()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_redis_restarting_empty_while_frames_are_sent_loses_nothing(tmp_path, redis_server, workers, database_url):
    rows, outage_s = 2_000, 30
    workers.start()
    sink = RedisSink(redis_server.url, spool_dir=tmp_path / "spool", ack_poll_s=0.2, resend_after_s=120, close_timeout_s=120)
    seq = 0

    def send_for(seconds):
        nonlocal seq
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            sink.send(make_frame("rr", "p0", seq, n=rows))
            seq += 1
            time.sleep(0.1)

    send_for(3)
    redis_server.stop()
    send_for(outage_s)  # send() keeps returning; frames wait in the spool
    spooled = len(list((tmp_path / "spool").rglob("*.frame")))
    redis_server.start()  # empty: no stream, no group, no acks
    send_for(3)
    sink.send(make_frame("rr", "p0", seq, n=rows, final=True))
    seq += 1
    assert sink.wait_acked(120), workers.logs()
    sink.close()
    assert spooled > 0 and sink.stats["dropped"] == 0
    store = Store(tmp_path / "store", database_url)
    assert_exactly_once(store, "rr", seq, rows)
    store.close()


def _pg_cluster():
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    return versions[-1] if versions else None


def _pg_up(url) -> bool:
    try:
        engine = create_engine(url)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
        return True
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_postgresql_restart_during_ingest_loses_nothing(tmp_path, redis_server, workers, database_url, postgres_url):
    version = _pg_cluster()
    if version is None or shutil.which("pg_ctlcluster") is None:
        pytest.skip("no local PostgreSQL cluster to restart (pg_ctlcluster / /etc/postgresql absent)")
    frames, rows = 80, 10_000
    workers.start()
    sink = RedisSink(redis_server.url, spool_dir=tmp_path / "spool", ack_poll_s=0.2, resend_after_s=600, close_timeout_s=120)
    store = Store(tmp_path / "store", database_url)
    try:
        sender = threading.Thread(target=lambda: [sink.send(make_frame("pg", "p0", s, n=rows, final=s == frames - 1))
                                                  or time.sleep(0.05) for s in range(frames)])
        sender.start()
        wait_until(lambda: stored_frames(store, "pg") >= 5, 60, what="the first frames to be stored")
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"], check=True,
                       capture_output=True, timeout=60)
        sender.join()
        assert sink.wait_acked(120), workers.logs()
        sink.close()
        store.engine.dispose()  # its pooled connections died with the server
        assert_exactly_once(store, "pg", frames, rows)
    finally:
        if not _pg_up(postgres_url):
            subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"], capture_output=True, timeout=60)
        wait_until(lambda: _pg_up(postgres_url), 60, what="PostgreSQL to be back up")
        store.close()
