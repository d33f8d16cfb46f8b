"""Real expert-parallel groups (torchrun, gloo on CPU, 2 ranks): the probe records where the framework put
each expert, with no map given, and the stored run charts tokens per device."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from moescope.analysis import compute_metric
from moescope.analysis.store import AnalysisStore as Store
from moescope.frame import decode

RANKS, E = 2, 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(framework: str, out: Path) -> list:
    job = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}",
         f"--master_port={_free_port()}", str(Path(__file__).parent / "ep_job.py"), framework, str(out)],
        capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert job.returncode == 0, job.stderr[-3000:]
    return [decode(p.read_bytes()) for p in sorted(out.glob("rank*.frame"))]


CONTIGUOUS = {"num_devices": RANKS, "layers": {"0": [0] * 4 + [1] * 4, "1": [0] * 4 + [1] * 4}}


def job_with_recorded_map(framework: str, tmp_path):
    """The job's frames, after checking every rank recorded the contiguous map read from the framework."""
    frames = run_job(framework, tmp_path)
    configs = [f.meta["run_config"] for f in frames if f.seq == 0]
    assert len(configs) == RANKS
    assert all(c["expert_devices"] == {"source": framework, **CONTIGUOUS} for c in configs)
    return frames


def test_megatron_expert_parallel_group_is_recorded_and_charts_tokens_per_device(tmp_path):
    pytest.importorskip("megatron.core.transformer.moe.moe_layer")
    frames = job_with_recorded_map("megatron", tmp_path)
    store = Store(tmp_path / "store")
    try:
        for frame in frames:
            assert store.write_frame(frame)
        load = compute_metric(store, "device_load", "ep-megatron")
        # Counted from the routing rows of both ranks: device d computes experts 4d .. 4d + 3.
        counted = store.sql("SELECT step, layer, expert // 4 AS device, count(*)::DOUBLE AS tokens FROM routing "
                            "GROUP BY ALL ORDER BY step, layer, device", run="ep-megatron")
        assert load[["step", "layer", "device", "tokens"]].to_dict("records") == counted.to_dict("records")
        assert len(counted) == 3 * 2 * RANKS
    finally:
        store.close()


def test_deepspeed_expert_parallel_group_is_recorded(tmp_path):
    pytest.importorskip("deepspeed.moe.layer")
    frames = job_with_recorded_map("deepspeed", tmp_path)
    # MOELayer's sparse routes are recorded: every rank, step, layer, token and slot (top-2, 24 tokens).
    rows = [f.tables["routing"] for f in frames if "routing" in f.tables]
    per_rank = {r: sum(t.num_rows for t in rows if t.column("rank")[0].as_py() == r) for r in range(RANKS)}
    assert per_rank == {r: 3 * 2 * 24 * 2 for r in range(RANKS)}


def test_deepspeed_ep_size_is_read_before_its_group_exists():
    pytest.importorskip("deepspeed.moe.layer")
    import torch
    from deepspeed.moe.layer import MoE

    from moescope.probe import attach

    model = torch.nn.ModuleList(MoE(hidden_size=16, expert=torch.nn.Linear(16, 16), num_experts=4, ep_size=2, k=1)
                                for _ in range(2))
    with attach(model, sink="memory", run="ds") as probe:  # before deepspeed.initialize sets the groups
        pass
    assert probe.sink.frames[0].meta["run_config"]["expert_devices"] == {
        "source": "deepspeed", "num_devices": 2, "layers": {"0": [0, 0, 1, 1], "1": [0, 0, 1, 1]}}
