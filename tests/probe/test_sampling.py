"""Per-token sampling thins the rows, never the aggregates: a sampled run's metrics equal the full run's."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from moescope.analysis import compute_metric
from moescope.analysis.store import AnalysisStore as Store
from moescope.kernels import MoEConfig, ModelConfig, MoETransformer
from moescope.probe import MemorySink, attach

# Every metric read from expert_step or the rollups: counted over every token whatever sample_rate keeps.
AGGREGATE_METRICS = ("load_share", "switch_score", "maxvio", "cv", "utilisation", "dead_experts", "drop_rate", "entropy",
                     "z", "margin", "domain_specialisation", "coactivation", "repetition")


def record(store: Store, run: str, sample_rate: float) -> None:
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=3, num_heads=2, ffn_size=48, max_seq_len=32,
                      moe=MoEConfig(num_experts=6, top_k=2, score="softmax", capacity_factor=1.0))
    model = MoETransformer.from_config(cfg, seed=0)
    g = torch.Generator().manual_seed(0)  # the same batches for both runs
    sink = MemorySink()
    with attach(model, sink=sink, run=run, sample_rate=sample_rate, seed=5) as probe, torch.no_grad():
        for step in range(4):
            probe.set_step(step)
            probe.set_domains(["code", "text", "math", "code", "text", "math", "code", "text"])
            model(torch.randint(0, 64, (8, 24), generator=g))
    for frame in sink.frames:
        store.write_frame(frame)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = Store(tmp_path_factory.mktemp("sampling") / "store")
    record(s, "full", 1.0)
    record(s, "sampled", 0.25)
    yield s
    s.close()


def test_sampling_keeps_a_fraction_of_the_per_token_rows(store):
    full = store.sql("SELECT count(*) AS n FROM routing", run="full").n[0]
    sampled = store.sql("SELECT count(*) AS n FROM routing", run="sampled").n[0]
    assert 0 < sampled < full / 2


@pytest.mark.parametrize("name", AGGREGATE_METRICS)
def test_a_sampled_runs_aggregate_metrics_equal_the_full_runs(store, name):
    full = compute_metric(store, name, "full")
    sampled = compute_metric(store, name, "sampled")
    assert len(full)
    pd.testing.assert_frame_equal(full, sampled, check_exact=False, rtol=1e-9)
