"""The stream and the store under hostile and broken input: nothing forged, nothing lost.

Each test is one case of an adversarial review, run against a real Redis with the
stream consumer in this process (or real worker processes where the process matters).
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from ingest_helpers import STREAM, Workers, free_port, make_frame, wait_until  # noqa: E402

from moescope.collector.check import check_run
from moescope.collector.store import StoreError
from moescope.analysis.store import AnalysisStore as Store
from moescope.collector.stream import GROUP, StreamIngestor
from moescope.frame import Frame, encode
from moescope.probe.redis_sink import RedisSink

DEAD = "moescope:dead"
CLI = [sys.executable, "-c", "from moescope.cli import entry; entry()"]


class Consumer:
    """A StreamIngestor looping in a thread of this process until stopped."""

    def __init__(self, store, client, **kw):
        self.ingestor = StreamIngestor(store, client, STREAM, DEAD, "c0", block_ms=50, **kw)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.ingestor.run, args=(self.stop,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self.ingestor

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(30)


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_a_frame_id_with_a_path_is_dead_lettered_and_cannot_touch_another_run(tmp_path, redis_server, store):
    client = redis_server.client()
    victim = make_frame("victim", "pv", 0, n=50, final=True)
    assert store.write_frame(victim)
    before = store.sql("SELECT count(*) AS n FROM routing", run="victim").n[0]
    outside = tmp_path / "outside"
    forged = []
    for fid in (f"../run=victim/{victim.frame_id}", "../../../outside/x", f"{victim.frame_id[:-1]}/"):
        frame = make_frame("attacker", "pa", len(forged), n=500)
        frame.frame_id = fid
        forged.append(fid)
        client.xadd(STREAM, {"frame": encode(frame)})
    with Consumer(store, client) as ing:
        wait_until(lambda: ing.counts["dead"] == 3, 30, what="three dead letters")
    assert store.sql("SELECT count(*) AS n FROM routing", run="victim").n[0] == before
    assert not outside.exists()
    assert all(p.resolve().is_relative_to(store.root) for p in _files(store.root))
    reasons = [e[1][b"reason"].decode() for e in client.xrange(DEAD)]
    assert all("invalid frame id" in r for r in reasons)
    text, code = check_run(store, "victim")
    assert code == 0, text


def test_store_refuses_unsafe_ids_and_never_deletes_outside_its_root(tmp_path, store):
    frame = make_frame("r1", "p", 0, n=10)
    frame.frame_id = "../../escape"
    with pytest.raises(StoreError, match="invalid frame id"):
        store.write_frame(frame)
    # Metadata pointing outside the root (an older store, a hand edit) is never followed when deleting.
    keep = tmp_path / "precious.txt"
    keep.write_text("x")
    assert store.write_frame(make_frame("r2", "p2", 0, n=10, final=True))
    from moescope.collector import metadata as md

    with store.engine.begin() as conn:
        conn.execute(md.segments.insert().values(path="../precious.txt", run="r2", table_name="routing", rows=1,
                                                 created_at=0.0))
    store.delete_run("r2")
    assert keep.read_text() == "x"


def test_a_reused_producer_seq_is_a_conflict_reported_to_its_sink_never_stored(tmp_path, redis_server, store):
    client = redis_server.client()
    with Consumer(store, client):
        first = RedisSink(redis_server.url, spool_dir=tmp_path / "s1", ack_poll_s=0.05)
        for seq in range(4):
            first.send(make_frame("run-a", "shared", seq, n=20, final=seq == 3))
        assert first.wait_acked(60)
        first.close()
        second = RedisSink(redis_server.url, spool_dir=tmp_path / "s2", ack_poll_s=0.05)
        for seq in range(5):
            second.send(make_frame("run-b", "shared", seq, n=30, final=seq == 4))
        assert second.wait_acked(60)
        second.close()
    assert first.stats["acked"] == 4 and first.stats["rejected"] == 0
    # Seqs 0..3 were taken by run-a: run-b's four frames there are refused, only seq 4 is stored.
    assert second.stats["acked"] == 1 and second.stats["rejected"] == 4
    assert all("already stored" in reason for _, _, reason in second.rejected)
    assert store.sql("SELECT count(*) AS n FROM routing", run="run-a").n[0] == 80
    assert store.sql("SELECT count(*) AS n FROM routing", run="run-b").n[0] == 30
    text, code = check_run(store, "run-b")
    assert code == 1 and "4 refused as (producer, seq) conflicts" in text
    assert check_run(store, "run-a")[1] == 0
    # A refused frame leaves no segment file behind.
    assert len(list((store.root / "segments" / "routing" / "run=run-b").glob("*.parquet"))) == 1


def test_default_producer_ids_do_not_collide():
    from moescope.probe.framer import default_producer

    assert len({default_producer(0) for _ in range(1000)}) == 1000


def test_store_errors_leave_frames_pending_until_the_store_recovers(tmp_path, redis_server, store):
    client = redis_server.client()
    real, calls = store.write_frame, {"n": 0}

    def flaky(frame):
        calls["n"] += 1
        if calls["n"] <= 5:
            raise RuntimeError("store bug for a while")
        return real(frame)

    store.write_frame = flaky
    sink = RedisSink(redis_server.url, spool_dir=tmp_path / "spool", ack_poll_s=0.05)
    with Consumer(store, client, max_attempts=100, max_backoff_s=0.2) as ing:
        for seq in range(3):
            sink.send(make_frame("flaky", "pf", seq, n=25, final=seq == 2))
        assert sink.wait_acked(120)
        sink.close()
    assert ing.counts["store_errors"] == 5 and ing.counts["dead"] == 0 and ing.counts["parked"] == 0
    assert sink.stats["rejected"] == 0
    text, code = check_run(store, "flaky")
    assert code == 0, text
    assert store.ledger("flaky").stored.tolist() == [3]


def test_a_frame_the_store_keeps_failing_on_is_parked_whole_and_never_acknowledged(redis_server, store):
    client = redis_server.client()
    data = encode(make_frame("parked", "pp", 0, n=40))

    def broken(frame):
        raise RuntimeError("store bug")

    store.write_frame = broken
    client.xadd(STREAM, {"frame": data, "ack": f"{STREAM}:acks:pp"})
    with Consumer(store, client, max_attempts=3, max_backoff_s=0.05) as ing:
        wait_until(lambda: ing.counts["parked"] == 1, 30, what="the message to be parked")
    (entry,) = client.xrange(f"{STREAM}:parked")
    assert entry[1][b"frame"] == data and b"store bug" in entry[1][b"reason"]
    assert client.scard(f"{STREAM}:acks:pp") == 0 and client.hlen(f"{STREAM}:rejected:pp") == 0
    assert client.xlen(DEAD) == 0
    assert client.xpending(STREAM, GROUP)["pending"] == 0


def test_dead_letters_are_bounded_in_bytes(redis_server, store):
    client = redis_server.client()
    for i in range(30):
        client.xadd(STREAM, {"frame": b"MOEF" + bytes([i]) * 100_000})
    with Consumer(store, client, dead_budget_bytes=1_000_000) as ing:
        wait_until(lambda: ing.counts["dead"] == 30, 60, what="thirty dead letters")
    assert client.xlen(DEAD) < 30
    assert client.memory_usage(DEAD, samples=0) <= 1_000_000
    assert len(store.sql("SELECT 1")) == 1  # the store is untouched and fine


def test_huge_sequence_numbers_and_drop_reports_cost_what_they_hold(store):
    assert store.write_frame(make_frame("big", "pb", 0, n=5))
    last = make_frame("big", "pb", 2**31 - 1, n=5, final=True)
    last.dropped_seqs = list(range(1, 20_001))
    assert store.write_frame(last)
    ledger = store.ledger("big")
    assert ledger.sent.tolist() == [2**31] and ledger.dropped.tolist() == [20_000]
    assert ledger.missing.tolist() == [2**31 - 20_002]
    assert ledger.missing_seqs.tolist()[0] == list(range(20_001, 20_021))


def _corrupt_one_segment(store, run):
    path = Path(store.segment_paths("routing", run)[0])
    path.write_bytes(path.read_bytes()[:100])
    return path


def test_a_corrupt_segment_is_quarantined_and_the_rest_of_the_run_stays_queryable(tmp_path, store):
    for seq in range(4):
        assert store.write_frame(make_frame("hurt", "ph", seq, n=10, final=seq == 3))
    bad = _corrupt_one_segment(store, "hurt")
    Path(store.segment_paths("routing", "hurt")[1]).unlink()  # and one missing altogether
    assert store.sql("SELECT count(*) AS n FROM routing", run="hurt").n[0] == 20
    assert not bad.exists() and (store.root / "quarantine").is_dir()
    load = store.metric("load_share", run="hurt")
    assert not load.empty
    text, code = check_run(store, "hurt")
    assert code == 1 and "2 unreadable segment(s) quarantined (20 rows)" in text
    out = store.export("hurt", tmp_path / "hurt.duckdb")
    assert out.exists() and not list(tmp_path.glob("hurt.duckdb.tmp-*"))


def test_deleting_a_run_removes_its_quarantined_segments_too(store):
    for seq in range(3):
        assert store.write_frame(make_frame("gone", "pg", seq, n=10, final=seq == 2))
    assert store.write_frame(make_frame("kept", "pk", 0, n=10, final=True))
    _corrupt_one_segment(store, "gone")
    check_run(store, "gone")
    assert len(store.quarantined("gone")) == 1
    store.delete_run("gone")
    assert store.quarantined("gone").empty
    assert not [p for p in (store.root / "quarantine").rglob("*") if p.is_file()]
    assert store.sql("SELECT count(*) AS n FROM routing", run="kept").n[0] == 10


def test_a_segment_whose_footer_read_fails_once_is_read_again_not_quarantined(store, monkeypatch):
    """A reset connection to object storage during check is not a bad segment."""
    for seq in range(2):
        assert store.write_frame(make_frame("flaky", "pf", seq, n=10, final=seq == 1))
    real, failed = store.files.read_metadata, []

    def once_reset(rel):
        if not failed:
            failed.append(rel)
            raise ConnectionResetError("connection reset by peer")
        return real(rel)

    monkeypatch.setattr(store.files, "read_metadata", once_reset)
    text, code = check_run(store, "flaky")
    assert failed and code == 0, text
    assert store.quarantined("flaky").empty
    assert store.sql("SELECT count(*) AS n FROM routing", run="flaky").n[0] == 20


def test_check_finds_a_corrupt_segment_before_any_query_does(store):
    for seq in range(2):
        assert store.write_frame(make_frame("quiet", "pq", seq, n=10, final=seq == 1))
    _corrupt_one_segment(store, "quiet")
    text, code = check_run(store, "quiet")
    assert code == 1 and "quarantined routing segment" in text


def test_compaction_skips_an_unreadable_segment_without_leaking_temp_files(store):
    for seq in range(8):
        assert store.write_frame(make_frame("cmp", "pc", seq, n=10, final=seq == 7))
    _corrupt_one_segment(store, "cmp")
    store.compact(min_files=2)
    assert not list(store.root.rglob("*.tmp"))
    assert len(store.quarantined("cmp")) == 1
    assert len(store.segment_paths("expert_step", "cmp")) == 1  # the other table was still compacted
    assert store.compact(min_files=2) >= 0 and store.sql("SELECT count(*) AS n FROM routing", run="cmp").n[0] == 70


def test_read_only_commands_never_create_or_recreate_a_metadata_db(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StoreError, match="no store metadata"):
        Store(empty, create=False)
    assert not (empty / "meta.sqlite").exists()
    zero = tmp_path / "zero"
    zero.mkdir()
    (zero / "meta.sqlite").write_bytes(b"")
    with pytest.raises(StoreError, match="empty"):
        Store(zero, create=False)
    assert (zero / "meta.sqlite").stat().st_size == 0
    bad = tmp_path / "bad"
    Store(bad).close()
    (bad / "meta.sqlite").write_bytes((bad / "meta.sqlite").read_bytes()[:1000] + b"\0" * 10)
    with pytest.raises(StoreError, match="cannot open metadata database"):
        Store(bad, create=False)


def test_cli_read_only_command_on_a_truncated_store_is_one_line(tmp_path):
    root = tmp_path / "s"
    Store(root).close()
    (root / "meta.sqlite").write_bytes(b"SQLite format 3\0" + b"\x07" * 50)
    proc = subprocess.run([*CLI, "runs", "--store", str(root)], capture_output=True,
                          text=True, timeout=120, env={k: v for k, v in os.environ.items() if k != "MOESCOPE_DEBUG"})
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("moescope: error:"), proc.stderr


def test_a_worker_whose_metadata_db_is_unusable_exits_non_zero(tmp_path, redis_server):
    store_root = tmp_path / "store"
    store_root.mkdir()
    (store_root / "meta.sqlite").write_bytes(b"this is not a database" * 100)
    workers = Workers(redis_server.url, store_root, None, tmp_path / "logs")
    proc = workers.start(wait=False)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        workers.stop_all()
        pytest.fail("the worker kept running with an unusable metadata DB:\n" + workers.logs())
    assert proc.returncode != 0
    assert "not a database" in workers.logs()


def test_leaving_attach_with_redis_down_is_bounded_and_the_next_sink_delivers_the_spool(tmp_path, redis_server, store):
    spool = tmp_path / "spool"
    down = RedisSink(f"redis://127.0.0.1:{free_port()}/0", spool_dir=spool, close_timeout_s=0.5)
    for seq in range(3):
        down.send(make_frame("late", "gone", seq, n=15, final=seq == 2))
    down.close()
    assert len(down.unacked) == 3
    assert len(list((spool / "gone").glob("*.frame"))) == 3
    client = redis_server.client()
    with Consumer(store, client):
        later = RedisSink(redis_server.url, spool_dir=spool, ack_poll_s=0.05)
        assert later.stats["adopted"] == 3
        assert later.wait_acked(60)
        later.close()
    assert check_run(store, "late")[1] == 0
    assert not list((spool / "gone").glob("*.frame"))


def test_a_live_sinks_spool_is_never_adopted_by_another(tmp_path, redis_server):
    spool, url = tmp_path / "spool", f"redis://127.0.0.1:{free_port()}/0"
    live = RedisSink(url, spool_dir=spool, close_timeout_s=0.2)
    live.send(make_frame("busy", "alive", 0, n=5))
    assert live.flush(10)
    other = RedisSink(url, spool_dir=spool, close_timeout_s=0.2)
    assert other.stats["adopted"] == 0
    other.close()
    live.close()


def test_resend_command_delivers_a_dead_producers_spool(tmp_path, redis_server, store):
    spool = tmp_path / "spool"
    down = RedisSink(f"redis://127.0.0.1:{free_port()}/0", spool_dir=spool, close_timeout_s=0.2)
    for seq in range(2):
        down.send(make_frame("resent", "dead", seq, n=10, final=seq == 1))
    down.close()
    client = redis_server.client()
    with Consumer(store, client):
        proc = subprocess.run([*CLI, "resend", str(spool / "dead"), "--broker", redis_server.url,
                               "--timeout", "60"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "2 left-over frame(s)" in proc.stdout and "2 stored" in proc.stdout
    assert check_run(store, "resent")[1] == 0


def test_trailing_newline_run_ids_are_refused_everywhere(store):
    frame = Frame(run="r\n", producer="p", seq=0, tables={"routing": make_frame("r", "p", 0).tables["routing"]})
    with pytest.raises(StoreError, match="invalid run id"):
        store.write_frame(frame)
    assert store.runs().empty
