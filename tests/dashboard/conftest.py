"""A small recorded run built in code from a fixed seed, written through Store.write_frame.

Run "synthetic": 2 MoE layers (0 and 1) × 4 experts, top-2, 5 steps of 32 tokens (two
sequences labelled "code" and "prose"); checkpoint "ck-early" covers steps 0–2 and
"ck-late" steps 3–4. Layer 1 never routes to expert 3, so it is dead.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest

from moescope.analysis.store import AnalysisStore as Store
from moescope.frame import Frame
from moescope.schema import EXPERT_STEP, ROUTING, TOKEN_STATS
from moescope.token_texts import ByteTokenizer, texts_for

RUN = "synthetic"
LAYERS, E, K, STEPS, SEQS, POSITIONS = (0, 1), 4, 2, 5, 2, 16
DOMAINS = ("code", "prose")
DEAD = {1: 3}  # layer -> expert its router never picks


def checkpoint_of(step: int) -> str:
    return "ck-early" if step < 3 else "ck-late"


def make_frame(step: int, rng: np.random.Generator, producer: str = "p0", run: str = RUN, *,
               probe_set: str | None = None, checkpoint: str | None = None) -> Frame:
    """One training step; with probe_set, a replay of that probe set (same token ids every time, phase eval)."""
    routing, stats, agg = [], [], []
    token_rng = np.random.default_rng(4242) if probe_set else rng
    checkpoint = checkpoint or checkpoint_of(step)
    phase = "eval" if probe_set else "train"
    for layer in LAYERS:
        logits_TE = rng.normal(size=(SEQS * POSITIONS, E)) * 1.5
        logits_TE[:, 0] += 0.8  # expert 0 is the favourite, so load is visibly unbalanced
        if layer in DEAD:
            logits_TE[:, DEAD[layer]] = -30.0
        probs_TE = np.exp(logits_TE - logits_TE.max(1, keepdims=True))
        probs_TE /= probs_TE.sum(1, keepdims=True)
        experts_TK = np.argsort(-probs_TE, axis=1)[:, :K]
        top_TK = np.take_along_axis(probs_TE, experts_TK, 1)
        weights_TK = top_TK / top_TK.sum(1, keepdims=True)
        lse_T = np.log(np.exp(logits_TE).sum(1))
        for t in range(SEQS * POSITIONS):
            seq, pos = divmod(t, POSITIONS)
            ctx = dict(run=run, checkpoint=checkpoint, step=step, rank=0, microbatch=0, seq=seq, pos=pos,
                       token_id=int(token_rng.integers(0, 256)), layer=layer)
            for slot in range(K):
                routing.append(dict(ctx, slot=slot, expert=int(experts_TK[t, slot]), weight=float(weights_TK[t, slot]),
                                    dropped=False, domain=DOMAINS[seq], phase=phase, probe_set=probe_set))
            p = probs_TE[t]
            stats.append(dict(ctx, entropy=float(-(p * np.log(np.clip(p, 1e-30, None))).sum()), logsumexp=float(lse_T[t]),
                              margin=float(top_TK[t, 0] - top_TK[t, 1]), domain=DOMAINS[seq], phase=phase))
        for expert in range(E):
            chosen = experts_TK == expert
            agg.append(dict(run=run, checkpoint=checkpoint, step=step, rank=0, layer=layer, expert=expert,
                            num_tokens=SEQS * POSITIONS, tokens=int(chosen.sum()), dropped=0,
                            top1=int(chosen[:, 0].sum()), prob_sum=float(probs_TE[:, expert].sum()),
                            weight_sum=float(weights_TK[chosen].sum()), phase=phase))
    tables = {"routing": pa.Table.from_pylist(routing, schema=ROUTING),
              "token_stats": pa.Table.from_pylist(stats, schema=TOKEN_STATS),
              "expert_step": pa.Table.from_pylist(agg, schema=EXPERT_STEP)}
    meta = {"layers": [{"layer": layer, "module_path": f"layers.{layer}.mlp.router", "num_experts": E, "top_k": K,
                        "router_kind": "softmax-topk", "capacity_factor": None} for layer in LAYERS],
            "checkpoints": [{"checkpoint": checkpoint, "step": 0 if step < 3 else 3}],
            # What the probe sends for the reference model's bytes (attach(..., tokenizer=ByteTokenizer())).
            "token_texts": [[i, t] for i, t in texts_for(ByteTokenizer(), sorted({r["token_id"] for r in routing})).items()]}
    return Frame(run=run, producer=producer, seq=step, tables=tables, meta=meta, final=step == STEPS - 1)


def fill_store(store: Store, seed: int = 0, run: str = RUN) -> Store:
    rng = np.random.default_rng(seed)
    for step in range(STEPS):
        assert store.write_frame(make_frame(step, rng, run=run, producer="p0" if run == RUN else f"p0-{run}"))
    return store


PROBE_SET = "probe"


def add_replays(store: Store, run: str = RUN, seed: int = 11) -> Store:
    """Replays of the probe set through both checkpoints of `run`, at the checkpoints' steps."""
    rng = np.random.default_rng(seed)
    for i, (checkpoint, step) in enumerate((("ck-early", 0), ("ck-late", 3))):
        frame = make_frame(step, rng, producer=f"replay-{run}", run=run, probe_set=PROBE_SET, checkpoint=checkpoint)
        assert store.write_frame(dataclasses.replace(frame, seq=i, final=False))
    return store


@pytest.fixture
def recorded_store(tmp_path) -> Store:
    store = fill_store(Store(tmp_path / "store"))
    yield store
    store.close()


@pytest.fixture
def empty_store(tmp_path) -> Store:
    store = Store(tmp_path / "empty-store")
    yield store
    store.close()


@pytest.fixture
def browser(tmp_path):
    from .browser_support import HAVE_CHROMIUM, make_driver

    if not HAVE_CHROMIUM:
        pytest.skip("needs Debian's chromium and chromium-driver")
    driver = make_driver(tmp_path / "chromium-profile")
    try:
        yield driver
    finally:
        driver.quit()
