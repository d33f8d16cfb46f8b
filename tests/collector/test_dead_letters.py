"""Malformed messages among good frames: dead-lettered with a reason, ingestion continues."""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from ingest_helpers import make_frame, wait_drained  # noqa: E402

from moescope.analysis.store import AnalysisStore as Store
from moescope.frame import MAGIC, encode
from moescope.probe.redis_sink import RedisSink


def _with_header(data: bytes, mutate) -> bytes:
    (hlen,) = struct.unpack_from("<I", data, len(MAGIC))
    header = json.loads(data[len(MAGIC) + 4 : len(MAGIC) + 4 + hlen])
    mutate(header)
    new = json.dumps(header).encode()
    return MAGIC + struct.pack("<I", len(new)) + new + data[len(MAGIC) + 4 + hlen :]


HEADER_MUTATIONS = [
    lambda h: h.update(schema_version=99),
    lambda h: h.update(seq=-3),
    lambda h: h.update(seq="7"),
    lambda h: h.pop("run"),
    lambda h: h.update(producer=""),
    lambda h: h.update(run="../etc"),
    lambda h: h.update(dropped_seqs="none"),
    lambda h: h.update(meta=[1, 2]),
    lambda h: h["tables"][0].update(rows=h["tables"][0]["rows"] + 1),
    lambda h: h["tables"][0].update(name="weights"),
]


def fuzzed_messages(count: int, seed: int) -> list[dict]:
    """`count` malformed stream messages of ten kinds, from a fixed seed."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        kind = i % 10
        # Every message derives from its own frame (own uuid), as a corrupted producer's would.
        good = encode(make_frame("fuzz", f"fz{i % 7}", i, n=16))
        if kind == 0:
            data = rng.bytes(int(rng.integers(0, 2000)))
        elif kind == 1:
            data = good[: int(rng.integers(0, len(good)))]
        elif kind == 2:
            data = _with_header(good, HEADER_MUTATIONS[int(rng.integers(len(HEADER_MUTATIONS)))])
        elif kind == 3:
            other_run = make_frame("fuzz", "fz", i, n=8)
            other_run.tables["routing"] = make_frame("someone-else", "fz", i, n=8).tables["routing"]
            data = encode(other_run)
        elif kind == 4:
            missing_col = make_frame("fuzz", "fz", i, n=8)
            missing_col.tables["routing"] = missing_col.tables["routing"].drop_columns(["expert"])
            data = encode(missing_col)
        elif kind == 5:
            data = good + rng.bytes(int(rng.integers(1, 64)))
        elif kind == 6:
            data = MAGIC + struct.pack("<I", 1 << 30)
        elif kind == 7:
            out.append({"payload": b"no frame field"})
            continue
        else:  # bytes flipped inside the Arrow body
            data = bytearray(good)
            for _ in range(int(rng.integers(1, 8))):
                data[int(rng.integers(200, len(data)))] ^= int(rng.integers(1, 256))
            data = bytes(data)
            if data == good:
                data = data[:-1]
        out.append({"frame": data})
    return out


def test_garbage_is_dead_lettered_with_reasons_and_good_frames_are_all_stored(tmp_path, redis_server, workers,
                                                                              database_url):
    workers.start()
    client = redis_server.client()
    # A stream bound above the message count: nothing is trimmed before the worker reads it.
    sink = RedisSink(redis_server.url, spool_dir=tmp_path / "spool", ack_poll_s=0.2, close_timeout_s=120, maxlen=10_000)
    garbage = fuzzed_messages(1000, seed=7)
    good_frames = 40
    for seq in range(good_frames):
        sink.send(make_frame("good", "p0", seq, n=300, final=seq == good_frames - 1))
        sink.flush(10)
        for message in garbage[seq * 25 : (seq + 1) * 25]:
            client.xadd(sink.stream, message)
    assert sink.wait_acked(120), workers.logs()
    sink.close()
    wait_drained(client)  # the garbage added after the last good frame too
    store = Store(tmp_path / "store", database_url)
    ledger = store.ledger("good")
    assert ledger[["sent", "stored", "missing"]].values.tolist() == [[good_frames, good_frames, 0]]
    assert store.sql("SELECT count(*) AS n FROM routing", run="good").n[0] == good_frames * 300
    # Bit flips may leave a frame that still decodes; everything else must be dead-lettered.
    dead = client.xrange("moescope:dead")
    with store.engine.connect() as conn:
        from moescope.collector import metadata as md
        from sqlalchemy import select

        reasons = [r for (r,) in conn.execute(select(md.dead_letters.c.reason))]
    fuzz_stored = int(store.ledger("fuzz").stored.sum()) if "fuzz" in store.runs().run.tolist() else 0
    assert len(dead) == len(reasons) == 1000 - fuzz_stored and fuzz_stored < 50
    assert all(reason.strip() for reason in reasons)
    assert all(fields[b"reason"] for _, fields in dead)
    kinds = {r.split(":")[0] for r in reasons}
    assert len(kinds) >= 8, sorted(kinds)[:20]  # distinct, specific reasons, not one catch-all
    store.close()
