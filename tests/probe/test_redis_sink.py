"""RedisSink and its spool: never blocks, keeps frames until the store acks, reports drops."""
from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
import redis

sys.path.insert(0, str(Path(__file__).parents[1] / "collector"))
from ingest_helpers import RedisServer, make_frame, redis_available, wait_drained, wait_until  # noqa: E402

from moescope.collector.check import check_run
from moescope.analysis.store import AnalysisStore as Store
from moescope.collector.stream import StreamIngestor
from moescope.frame import decode
from moescope.probe.redis_sink import RedisSink
from moescope.probe.spool import Spool

pytestmark = pytest.mark.skipif(not redis_available(), reason="redis-server binary not on PATH")


@pytest.fixture
def server(tmp_path):
    s = RedisServer(tmp_path / "redis").start()
    yield s
    s.stop()


class Consumer:
    """The real stream consumer, run on a thread of this process while the block is open."""

    def __init__(self, store, url):
        client = redis.Redis.from_url(url)
        self.ingestor = StreamIngestor(store, client, "moescope:frames", "moescope:dead", "test-consumer", block_ms=100)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self):
        while not self.stop.is_set():
            try:
                self.ingestor.run(self.stop)
            except redis.ConnectionError:
                self.stop.wait(0.1)

    def __enter__(self):
        self.thread.start()
        return self.ingestor

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(10)


def test_spool_writes_atomically_refuses_past_budget_and_reloads(tmp_path):
    spool = Spool(tmp_path / "s", budget_bytes=250)
    assert spool.put(0, b"a" * 100) and spool.put(1, b"b" * 100)
    assert not spool.put(2, b"c" * 100)  # would exceed 250 bytes
    assert spool.get(1) == b"b" * 100 and not list((tmp_path / "s").glob("*.tmp"))
    spool.remove(0)
    reopened = Spool(tmp_path / "s", budget_bytes=250)
    assert reopened.seqs() == [1] and reopened.bytes_used == 100


def test_frames_stay_spooled_until_the_store_acknowledges_them(tmp_path, server):
    sink = RedisSink(server.url, spool_dir=tmp_path / "spool", ack_poll_s=0.05)
    for seq in range(3):
        sink.send(make_frame("ack", "p0", seq, n=50, final=seq == 2))
    assert sink.flush(10)
    assert sorted(p.name for p in (tmp_path / "spool").rglob("*.frame")) == [f"{s:012d}.frame" for s in range(3)]
    store = Store(tmp_path / "store")
    with Consumer(store, server.url):
        assert sink.wait_acked(120)
    assert not list((tmp_path / "spool").rglob("*.frame"))
    assert server.client().scard("moescope:frames:acks:p0") == 0  # the sink cleans up the acks it consumed
    sink.close()
    assert sink.unacked == [] and sink.stats["acked"] == 3
    store.close()


def test_send_never_raises_while_redis_is_down_and_drops_past_the_budget_are_reported(tmp_path):
    server = RedisServer(tmp_path / "redis")  # not started yet: nothing listens on its port
    one = len(__import__("moescope.frame", fromlist=["encode"]).encode(make_frame("drop", "p0", 0, n=400)))
    sink = RedisSink(server.url, spool_dir=tmp_path / "spool", spill_budget_bytes=int(one * 3.5), queue_bytes=one * 2,
                     ack_poll_s=0.05, resend_after_s=0.5, close_timeout_s=30)
    for seq in range(8):
        sink.send(make_frame("drop", "p0", seq, n=400))
    spooled = lambda: len(list((tmp_path / "spool").rglob("*.frame")))  # noqa: E731
    wait_until(lambda: sink.stats["dropped"] + spooled() == 8, 60, what="every frame to be spooled or dropped")
    assert sink.stats["dropped"] >= 4
    dropped = sink.stats["dropped"]
    server.start()
    try:
        store = Store(tmp_path / "store")
        with Consumer(store, server.url):
            assert sink.wait_acked(120)
            sink.send(make_frame("drop", "p0", 8, n=400, final=True))  # carries the dropped seqs
            sink.close()
        ledger = store.ledger("drop")
        assert ledger[["sent", "stored", "dropped", "missing"]].values.tolist() == [[9, 9 - dropped, dropped, 0]]
        text, code = check_run(store, "drop")
        assert code == 1 and f"{dropped} dropped" in text  # a loss is reported, never silent
        store.close()
    finally:
        server.stop()


def test_a_dropped_final_frame_is_reported_by_a_trailer_at_close(tmp_path, server):
    sink = RedisSink(server.url, spool_dir=tmp_path / "spool", spill_budget_bytes=1, ack_poll_s=0.05, close_timeout_s=10)
    store = Store(tmp_path / "store")
    with Consumer(store, server.url):
        sink.send(make_frame("trail", "p0", 0, n=50, final=True))  # larger than the 1-byte spill budget
        sink.close()
    assert sink.unacked == []
    ledger = store.ledger("trail")
    assert ledger[["sent", "stored", "dropped", "missing"]].values.tolist() == [[2, 1, 1, 0]]
    store.close()


def test_unacknowledged_frames_are_resent_and_stored_once(tmp_path, server):
    sink = RedisSink(server.url, spool_dir=tmp_path / "spool", ack_poll_s=0.05, resend_after_s=0.3)
    sink.send(make_frame("resend", "p0", 0, n=50, final=True))
    client = server.client()
    wait_until(lambda: client.xlen("moescope:frames") >= 3, 60, what="re-sends of the unacknowledged frame")
    ids = {decode(fields[b"frame"]).frame_id for _, fields in client.xrange("moescope:frames")}
    assert len(ids) == 1  # the same frame, again
    store = Store(tmp_path / "store")
    with Consumer(store, server.url) as ingestor:
        assert sink.wait_acked(120)
        wait_drained(client)  # every copy read and settled, however fast the ack reached the sink
    sink.close()
    copies = sink.stats["sent"] + sink.stats["resent"]
    assert copies >= 3 and ingestor.counts["stored"] == 1 and ingestor.counts["duplicate"] == copies - 1
    assert store.sql("SELECT count(*) AS n FROM routing", run="resend").n[0] == 50
    store.close()


def test_bad_options_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="spill_budget_bytes must be positive"):
        RedisSink("redis://127.0.0.1:1/0", spool_dir=tmp_path, spill_budget_bytes=0)
    with pytest.raises(ValueError, match="invalid Redis sink URL"):
        RedisSink("redis://127.0.0.1:notaport/0", spool_dir=tmp_path)
    sink = RedisSink("redis://127.0.0.1:1/0", spool_dir=tmp_path, close_timeout_s=0.1)
    sink.close()
    with pytest.raises(RuntimeError, match="after close"):
        sink.send(make_frame("x", "p0", 0))


def test_a_sink_whose_every_pending_frame_is_refused_reports_them_and_keeps_delivering(tmp_path, server):
    store = Store(tmp_path / "store")
    with Consumer(store, server.url):
        first = RedisSink(server.url, spool_dir=tmp_path / "s1", ack_poll_s=0.05)
        for seq in range(2):
            first.send(make_frame("taken", "shared", seq, n=10))
        assert first.wait_acked(60)
        first.close()
        second = RedisSink(server.url, spool_dir=tmp_path / "s2", ack_poll_s=0.05, close_timeout_s=60)
        for seq in range(2):  # both seqs already stored under other frame ids: both refused
            second.send(make_frame("reused", "shared", seq, n=10))
        assert second.wait_acked(60) and second.stats["rejected"] == 2
        second.send(make_frame("reused", "shared", 2, n=10, final=True))
        assert second.wait_acked(60) and second.stats["acked"] == 1
        second.close()
    assert store.sql("SELECT count(*) AS n FROM routing", run="reused").n[0] == 10
    store.close()
