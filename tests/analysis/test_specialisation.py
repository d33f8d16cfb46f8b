"""Specialisation metrics from routing rows against numpy and the random baselines."""
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from synth_runs import DOMAINS, E, POSITIONS, SEQS, synth_steps, write_run_step
from moescope.analysis import compute_metric  # noqa: E402
from moescope.analysis.specialisation import repetition_baselines


def _random(steps):
    return [(s, x) for s in steps for x in s.layers if x.layer == 2]


def test_domain_specialisation_matches_numpy_and_uniform_is_k_over_e(synth):
    store, steps = synth
    ds = compute_metric(store, "domain_specialisation", "synth", layers=[2])
    dom_T = np.array([DOMAINS[q] for q in np.repeat(np.arange(SEQS), POSITIONS)])
    for domain in ("code", "text"):
        hit_E = sum(np.bincount(x.experts_TK[dom_T == domain].ravel(), minlength=E) for _, x in _random(steps))
        n = (dom_T == domain).sum() * len(steps)
        got = ds[ds.domain == domain].sort_values("expert")
        assert np.allclose(got.share, hit_E / n) and (got.tokens == n).all()
    code = ds[ds.domain == "code"].set_index("expert").share
    assert code[0] > 2 / E and code[0] > ds[ds.domain == "text"].set_index("expert").share[0]
    uni = compute_metric(store, "domain_specialisation", "synth", layers=[0])
    assert np.allclose(uni.share, 2 / E) and np.allclose(uni.uniform, 2 / E)


def test_vocab_specialisation_matches_numpy_and_drops_rare_ids(synth):
    store, steps = synth
    vs = compute_metric(store, "vocab_specialisation", "synth", layers=[2])
    ids = np.concatenate([s.token_ids_T for s, _ in _random(steps)])
    ex = np.concatenate([x.experts_TK for _, x in _random(steps)])
    for tid in np.unique(ids):
        got = vs[vs.token_id == tid].set_index("expert")
        hits = np.bincount(ex[ids == tid].ravel(), minlength=E)
        for e in got.index:
            assert got.share[e] == pytest.approx(hits[e] / (ids == tid).sum())
    assert compute_metric(store, "vocab_specialisation", "synth", layers=[2], min_count=10_000).empty


def test_vocab_specialisation_by_next_token(synth):
    store, steps = synth
    vs = compute_metric(store, "vocab_specialisation", "synth", layers=[2], next_token=True)
    # Token at pos p is attributed to the id at pos p + 1 of the same sequence.
    nxt = np.concatenate([s.token_ids_T.reshape(SEQS, POSITIONS)[:, 1:].ravel() for s, _ in _random(steps)])
    ex = np.concatenate([x.experts_TK.reshape(SEQS, POSITIONS, 2)[:, :-1].reshape(-1, 2) for _, x in _random(steps)])
    assert len(vs) > 0
    for r in vs.itertuples():
        mask = nxt == r.next_token_id
        assert r.tokens == mask.sum()
        assert r.share == pytest.approx((ex[mask] == r.expert).any(1).mean())


def test_coactivation_is_asymmetric_and_matches_numpy(synth):
    store, steps = synth
    co = compute_metric(store, "coactivation", "synth", layers=[2])
    ex = np.concatenate([x.experts_TK for _, x in _random(steps)])
    both = np.zeros((E, E))
    np.add.at(both, (ex[:, 0], ex[:, 1]), 1)
    np.add.at(both, (ex[:, 1], ex[:, 0]), 1)
    n_E = np.bincount(ex.ravel(), minlength=E)
    for r in co.itertuples():
        assert r.coactivation == pytest.approx(both[r.expert_i, r.expert_j] / n_E[r.expert_i])
    assert (co.expert_i != co.expert_j).all()
    # Uniform layer: each expert pairs with its two neighbours half of the time.
    uni = compute_metric(store, "coactivation", "synth", layers=[0])
    assert np.allclose(uni.coactivation, 0.5) and len(uni) == 2 * E


def test_repetition_matches_numpy_and_carries_random_baselines(synth):
    store, steps = synth
    assert repetition_baselines(8, 2) == pytest.approx((0.125, 0.4642857), rel=1e-6)
    rep = compute_metric(store, "repetition", "synth", layers=[2], by="step")
    assert rep.top1_baseline.iloc[0] == 0.125 and rep.topk_baseline.iloc[0] == pytest.approx(1 - 15 / 28)
    for (_, x), r in zip(_random(steps), rep.itertuples()):
        ex = x.experts_TK.reshape(SEQS, POSITIONS, 2)
        a, b = ex[:, 1:], ex[:, :-1]
        top1 = (a[..., 0] == b[..., 0]).mean()
        overlap = np.mean([len(set(p) & set(q)) > 0 for p, q in zip(a.reshape(-1, 2), b.reshape(-1, 2))])
        assert r.pairs == SEQS * (POSITIONS - 1)
        assert r.top1_repeat == pytest.approx(top1) and r.topk_overlap == pytest.approx(overlap)
    col = compute_metric(store, "repetition", "synth", layers=[1], by="window")
    assert col.top1_repeat.iloc[0] == 1.0


def test_vocab_specialisation_top_keeps_each_experts_highest_shares(synth):
    store, _ = synth
    full = compute_metric(store, "vocab_specialisation", "synth", layers=[2], by="window", min_count=1)
    top = compute_metric(store, "vocab_specialisation", "synth", layers=[2], by="window", min_count=1, top=3)
    want = (full.sort_values(["share", "tokens", "token_id"], ascending=[False, False, True], kind="stable")
            .groupby("expert").head(3).sort_values(["layer", "token_id", "expert"]).reset_index(drop=True))
    assert len(top) == len(want) and (top[want.columns].to_numpy() == want.to_numpy()).all()
    with pytest.raises(ValueError, match="top must be a positive int"):
        compute_metric(store, "vocab_specialisation", "synth", top=0)


@pytest.mark.parametrize("dense_cells", [1 << 21, 0])  # counted by bincount as the scan runs, or by DuckDB
def test_vocab_specialisation_over_the_whole_run_equals_the_counted_rows_and_follows_new_segments(store, monkeypatch,
                                                                                                   dense_cells):
    """The whole-run answer (counts kept per segment read) equals the same window counted from the rows."""
    from synth_runs import write_run

    from moescope.analysis import vocab_counts
    monkeypatch.setattr(vocab_counts._DenseCounts, "DENSE_CELLS", dense_cells)
    vocab_counts.KEPT.clear()

    steps = synth_steps()
    sizes = {0: (E, 2), 1: (E, 1), 2: (E, 2)}
    write_run(store, "grow", steps[:2], sizes)
    every_step = (0, 10**9)  # a step window: counted from the rows, nothing kept
    for top in (None, 2):
        kept = compute_metric(store, "vocab_specialisation", "grow", min_count=1, top=top)
        rows = compute_metric(store, "vocab_specialisation", "grow", steps=every_step, min_count=1, top=top)
        pd.testing.assert_frame_equal(kept, rows)
    before = compute_metric(store, "vocab_specialisation", "grow", layers=[2], min_count=1)
    for seq, s in enumerate(steps[2:], start=2):  # the run grows: two more frames of the same producer
        write_run_step(store, "grow", s, sizes, seq)
    after = compute_metric(store, "vocab_specialisation", "grow", layers=[2], min_count=1)
    pd.testing.assert_frame_equal(after, compute_metric(store, "vocab_specialisation", "grow", layers=[2],
                                                        steps=every_step, min_count=1))
    assert after["tokens"].sum() > before["tokens"].sum()
