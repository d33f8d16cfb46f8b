"""Beat schedules compaction; a worker runs it against the live store."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from ingest_helpers import make_frame, wait_until  # noqa: E402

from moescope.analysis.store import AnalysisStore as Store


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_beat_schedules_compaction_that_a_worker_runs(tmp_path, redis_server, workers, database_url):
    store = Store(tmp_path / "store", database_url)
    for seq in range(10):
        store.write_frame(make_frame("beat", "p0", seq, n=100))
    assert len(store.segment_paths("routing", "beat")) == 10
    workers.env["MOESCOPE_COMPACT_INTERVAL_S"] = "1"
    workers.start()
    log = open(tmp_path / "beat.log", "wb")
    beat = subprocess.Popen([sys.executable, "-m", "celery", "-A", "moescope.collector.celery_app", "beat",
                             "--loglevel=INFO", f"--schedule={tmp_path / 'beat-schedule'}"],
                            env=workers.env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: len(store.segment_paths("routing", "beat")) == 1, 60, what="scheduled compaction")
    finally:
        beat.terminate()
        beat.wait(15)
    assert store.sql("SELECT count(*) AS n FROM routing", run="beat").n[0] == 1000
    store.close()
