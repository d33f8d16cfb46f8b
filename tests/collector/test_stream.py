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
