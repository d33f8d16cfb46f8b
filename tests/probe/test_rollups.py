"""The probe's rollups equal what the store derives from the rows, and stay exact when rows are sampled."""
from __future__ import annotations

import duckdb
import numpy as np
import pytest
import torch

from moescope.analysis import compute_metric
from moescope.analysis.store import AnalysisStore as Store
from moescope.collector.rollups import rollups
from moescope.frame import Frame
from moescope.kernels import MoEConfig, ModelConfig, MoETransformer
from moescope.probe import MemorySink, attach
from moescope.schema import ROLLUPS, TABLES

SUMS = {"token_step": ["tokens", "entropy_sum", "margin_sum", "z_tokens", "z_sum"], "token_hist": ["tokens"],
        "domain_step": ["routed", "top1"], "coact_step": ["together"], "repeat_step": ["pairs", "top1_repeat", "topk_overlap"]}


def record(sample_rate: float, *, score: str = "softmax", top_k: int = 2, pad: bool = True) -> list[Frame]:
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=3, num_heads=2, ffn_size=48, max_seq_len=32,
                      moe=MoEConfig(num_experts=6, top_k=top_k, score=score, capacity_factor=1.0))
    model = MoETransformer.from_config(cfg, seed=0)
    g = torch.Generator().manual_seed(0)
    sink = MemorySink()
    with attach(model, sink=sink, run="roll", sample_rate=sample_rate, seed=3) as probe, torch.no_grad():
        for step in range(3):
            probe.set_step(step)
            probe.set_domains(["code", "text", None, "code", "text", "code"])
            ids = torch.randint(0, 64, (6, 24), generator=g)
            mask = torch.ones_like(ids)
            if pad:
                mask[1, :5] = 0  # left padding: not tokens, never counted
            model(ids, attention_mask=mask)
    return sink.frames


def summed(table, name: str) -> list[tuple]:
    """Rows summed per key, sorted: two tables compare equal however their rows were split."""
    sums = SUMS[name]
    key = [c for c in ROLLUPS[name].names if c not in sums]
    con = duckdb.connect()
    con.register("t", table)
    out = con.execute(f"SELECT {', '.join(key)}, {', '.join(f'sum({c})' for c in sums)} FROM t "
                      f"GROUP BY ALL ORDER BY ALL").fetchall()
    con.close()
    return [tuple(round(v, 3) if isinstance(v, float) else v for v in row) for row in out]


@pytest.mark.parametrize("score,top_k", [("softmax", 2), ("sigmoid", 3), ("softmax", 1)])
def test_probe_rollups_equal_what_the_store_derives_from_the_rows(score, top_k):
    frames = record(1.0, score=score, top_k=top_k)
    assert all(f.meta["rollups"] for f in frames)
    probe = {name: [f.tables[name] for f in frames if name in f.tables] for name in ROLLUPS}
    derived = {name: [] for name in ROLLUPS}
    for f in frames:
        for name, t in rollups({n: f.tables[n] for n in TABLES if n in f.tables}).items():
            derived[name].append(t)
    for name in ROLLUPS:
        mine = summed(pa_concat(probe[name], name), name)
        theirs = summed(pa_concat(derived[name], name), name)
        assert mine and mine == theirs, name


def pa_concat(tables, name):
    import pyarrow as pa

    return pa.concat_tables(tables) if tables else ROLLUPS[name].empty_table()


def test_rollups_cover_every_token_when_rows_are_sampled():
    frames = record(0.34)
    con = duckdb.connect()
    for name in ("expert_step", "token_step", "coact_step", "token_stats"):
        con.register(name, pa_concat([f.tables[name] for f in frames if name in f.tables], name)
                     if name in ROLLUPS else __import__("pyarrow").concat_tables([f.tables[name] for f in frames]))
    # expert_step is counted on the device over every token: the rollups agree with it, the rows do not.
    exact = con.execute("SELECT step, layer, max(num_tokens), sum(tokens) FROM expert_step GROUP BY ALL ORDER BY ALL").fetchall()
    tokens = dict(((s, l), n) for s, l, n in con.execute("SELECT step, layer, sum(tokens) FROM token_step GROUP BY ALL").fetchall())
    diag = dict(((s, l), n) for s, l, n in con.execute(
        "SELECT step, layer, sum(together) FROM coact_step WHERE expert_i = expert_j GROUP BY ALL").fetchall())
    rows = dict(((s, l), n) for s, l, n in con.execute("SELECT step, layer, count(*) FROM token_stats GROUP BY ALL").fetchall())
    assert exact and all(tokens[(s, l)] == t and diag[(s, l)] == a for s, l, t, a in exact)
    assert all(rows.get((s, l), 0) < t for s, l, t, _ in exact)  # about a third of the sequences kept
    assert all(t == 6 * 24 - 5 for _, _, t, _ in exact)  # padding is not a token


def test_metrics_from_rollups_equal_the_same_metrics_over_the_rows(tmp_path):
    store = Store(tmp_path / "s")
    for f in record(1.0):
        store.write_frame(f)
    for name in ("domain_specialisation", "coactivation", "repetition"):
        for by in ("step", "window"):
            fast = compute_metric(store, name, "roll", by=by)
            rows = compute_metric(store, name, "roll", by=by, exact=True)
            assert len(fast) and fast.shape == rows.shape, name
            for col in fast.columns:
                a, b = fast[col].to_numpy(), rows[col].to_numpy()
                assert (np.allclose(a, b, equal_nan=True) if a.dtype.kind == "f" else (a == b).all()), (name, by, col)
    ent = compute_metric(store, "entropy", "roll")
    exact = compute_metric(store, "entropy", "roll", exact=True)
    assert np.allclose(ent["mean"], exact["mean"]) and (ent.tokens == exact.tokens).all()
    assert np.allclose(ent.p50, exact.p50, rtol=0.05)
