"""The stream consumer on its own (in this process, real Redis): header peeking, consumer reaping."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from ingest_helpers import STREAM, make_frame  # noqa: E402

from moescope.collector.stream import GROUP, StreamIngestor, peek_header
from moescope.frame import encode


def test_peek_header_reads_ids_without_arrow_and_rejects_non_frames():
    frame = make_frame("peek", "p0", 4)
    header = peek_header(encode(frame))
    assert header["frame_id"] == frame.frame_id and header["seq"] == 4
    assert peek_header(b"garbage") is None and peek_header(b"MOEF\xff\xff") is None


def test_consumers_of_dead_workers_are_forgotten_once_idle_with_nothing_pending(tmp_path, redis_server, store):
    client = redis_server.client()
    live = StreamIngestor(store, client, STREAM, "moescope:dead", "live", block_ms=10)
    live.ensure_group()
    client.xadd(STREAM, {"frame": encode(make_frame("reap", "p0", 0, n=10))})
    dead = StreamIngestor(store, client, STREAM, "moescope:dead", "dead", block_ms=10)
    assert dead.step() == 1  # the "dead" consumer stored and acked its message, then went away
    live.step()
    assert {c["name"] for c in client.xinfo_consumers(STREAM, GROUP)} == {b"live", b"dead"}
    assert live.reap_consumers(idle_ms=0) == 1
    assert [c["name"] for c in client.xinfo_consumers(STREAM, GROUP)] == [b"live"]
    assert store.ledger("reap").stored.tolist() == [1]


def test_handled_messages_leave_the_stream_so_redis_holds_only_frames_not_yet_stored(tmp_path, redis_server, store):
    client = redis_server.client()
    ingestor = StreamIngestor(store, client, STREAM, "moescope:dead", "c0", block_ms=10)
    ingestor.ensure_group()
    frame = make_frame("settle", "p0", 0, n=10)
    for data in (encode(frame), encode(frame), b"not a frame"):  # stored, duplicate, dead letter
        client.xadd(STREAM, {"frame": data})
    waiting = client.xadd(STREAM, {"frame": encode(make_frame("settle", "p0", 1, n=10))})
    assert [ingestor.step() for _ in range(3)] == [1, 1, 1]
    assert ingestor.counts["stored"] == 1 and ingestor.counts["duplicate"] == 1 and ingestor.counts["dead"] == 1
    assert [mid for mid, _ in client.xrange(STREAM)] == [waiting]  # the one nobody has read yet
    assert client.xpending(STREAM, GROUP)["pending"] == 0
