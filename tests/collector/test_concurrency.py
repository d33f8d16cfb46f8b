"""Two workers writing while two reader processes query: no errors, no double counting, new data becomes visible.

How soon new data is visible is a benchmark figure (BENCHMARKS.md), not asserted here.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).parent))
from ingest_helpers import make_frame  # noqa: E402

from moescope.collector import metadata as md
from moescope.analysis.store import AnalysisStore as Store
from moescope.probe.redis_sink import RedisSink

DURATION_S = 60
READER = """
import json, sys, time, traceback
from moescope.analysis.store import AnalysisStore as Store
root, url, out, duration = sys.argv[1], sys.argv[2] or None, sys.argv[3], float(sys.argv[4])
store = Store(root, url)
end = time.time() + duration
with open(out, "w") as fh:
    while time.time() < end:
        try:
            df = store.sql("SELECT max(step) AS s, count(*) AS n FROM routing", run="conc")
            total = store.sql("SELECT sum(tokens) AS t FROM expert_step")
            fh.write(json.dumps({"t": time.time(), "step": None if df.s.isna()[0] else int(df.s[0]),
                                 "rows": int(df.n[0]), "tokens": None if total.t.isna()[0] else int(total.t[0])}) + "\\n")
        except Exception:
            fh.write(json.dumps({"t": time.time(), "error": traceback.format_exc()}) + "\\n")
        fh.flush()
        time.sleep(0.2)
"""


def _per_reader(tmp_path):
    return [[json.loads(line) for line in (tmp_path / f"reader{i}.jsonl").read_text().splitlines()] for i in range(2)]


def test_two_workers_and_two_readers_run_together_without_errors(tmp_path, redis_server, workers, database_url):
    rows = 20_000
    workers.start()
    workers.start()
    root = tmp_path / "store"
    readers = [subprocess.Popen([sys.executable, "-c", READER, str(root), database_url or "", str(tmp_path / f"reader{i}.jsonl"),
                                 str(DURATION_S)]) for i in range(2)]
    sink = RedisSink(redis_server.url, spool_dir=tmp_path / "spool", ack_poll_s=0.2, close_timeout_s=60)
    store = Store(root, database_url)
    seq, last_compact, end = 0, time.monotonic(), time.monotonic() + DURATION_S - 5
    while time.monotonic() < end:
        sink.send(make_frame("conc", "p0", seq, n=rows))
        seq += 1
        time.sleep(0.25)
        if time.monotonic() - last_compact > 10:  # compaction swaps files under the readers' feet
            store.compact(min_files=4)
            last_compact = time.monotonic()
    sink.send(make_frame("conc", "p0", seq, n=rows, final=True))
    seq += 1
    assert sink.wait_acked(60), workers.logs()
    sink.close()
    for reader in readers:
        assert reader.wait(DURATION_S + 60) == 0

    samples = [json.loads(line) for i in range(2) for line in (tmp_path / f"reader{i}.jsonl").read_text().splitlines()]
    errors = [s["error"] for s in samples if "error" in s]
    assert not errors, errors[0]
    assert len(samples) > 50
    with store.engine.connect() as conn:
        stored_at = dict(conn.execute(select(md.ingest_ledger.c.seq, md.ingest_ledger.c.stored_at)
                                      .where(md.ingest_ledger.c.run == "conc")).all())
    assert sorted(stored_at) == list(range(seq))
    # Each reader sees whole frames only (compaction never double counts or hides rows), never fewer
    # than before, and sees the data grow while the workers write.
    for reader_samples in _per_reader(tmp_path):
        counts = [s["rows"] for s in reader_samples if "rows" in s]
        assert all(n % rows == 0 and n <= seq * rows for n in counts)
        assert counts == sorted(counts)
        assert len(set(counts)) > 3
    assert store.sql("SELECT count(*) AS n FROM routing", run="conc").n[0] == seq * rows
    assert store.ledger("conc").missing.tolist() == [0]
    store.close()
