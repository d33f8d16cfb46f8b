"""A multi-rank job: torchrun (gloo on CPU), a probe per rank streaming to Redis, two worker processes.

Rows per rank are exact, expert_step adds up across ranks, and `check` is clean for every producer.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from ingest_helpers import Workers, free_port  # noqa: E402

from moescope.collector.check import check_run
from moescope.analysis.store import AnalysisStore as Store

RUN = "ddp"
RANKS, LAYERS, K = 2, 2, 2


def test_every_rank_of_a_torchrun_job_is_stored_exactly_and_merges_across_ranks(tmp_path, redis_server):
    workers = Workers(redis_server.url, tmp_path / "store", None, tmp_path / "logs")
    try:
        workers.start()
        workers.start()
        job = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}",
             f"--master_port={free_port()}", str(Path(__file__).parent / "multirank_job.py"), redis_server.url, RUN,
             str(tmp_path)], capture_output=True, text=True, timeout=600,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert job.returncode == 0, job.stderr[-3000:]
    finally:
        workers.stop_all()
    ranks = {r["rank"]: r for r in (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(RANKS))}
    assert all(r["unacked"] == 0 for r in ranks.values())
    store = Store(tmp_path / "store")
    per_rank = store.sql("SELECT rank, count(*) AS n FROM routing GROUP BY rank ORDER BY rank", run=RUN)
    assert per_rank.n.tolist() == [ranks[r]["tokens"] * LAYERS * K for r in range(RANKS)]
    stats = store.sql("SELECT rank, count(*) AS n FROM token_stats GROUP BY rank ORDER BY rank", run=RUN)
    assert stats.n.tolist() == [ranks[r]["tokens"] * LAYERS for r in range(RANKS)]
    merged = store.sql("SELECT step, layer, sum(tokens) AS assignments FROM expert_step GROUP BY step, layer", run=RUN)
    counted = store.sql("SELECT step, layer, count(*) AS assignments FROM routing GROUP BY step, layer", run=RUN)
    assert merged.sort_values(["step", "layer"]).assignments.tolist() == \
        counted.sort_values(["step", "layer"]).assignments.tolist()
    ledger = store.ledger(RUN)
    assert sorted(ledger.producer) == sorted(r["producer"] for r in ranks.values())
    assert ledger.missing.sum() == 0 and ledger.closed.all()
    text, code = check_run(store, RUN)
    assert code == 0, text
    store.close()
