"""Shortened scenario runs: a tiny model and a fresh context per scenario."""
from moescope.kernels import MoEConfig
from moescope.scenarios.report import Context
from moescope.scenarios.training import Recorder, Setup

# Small enough for a loaded CPU; the routing of each run is set by the scenario.
TINY = Setup(moe=MoEConfig(num_experts=8, top_k=2), hidden_size=32, num_layers=2, num_heads=2, ffn_size=64, seq_len=32,
             batch_size=8)


def context(store, prefix: str, steps: int, seed: int = 0) -> Context:
    return Context(recorder=Recorder(store), steps=steps, seed=seed, prefix=prefix)
