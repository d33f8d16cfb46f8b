"""Router health metrics from token_stats: entropy, z-loss, margin."""
import math

import numpy as np
import pytest

from moescope.analysis import compute_metric
from moescope.schema import SKETCH_ALPHA


def within_sketch(estimate: float, values: np.ndarray, q: float) -> bool:
    """The sketch's q-quantile lies within a relative SKETCH_ALPHA of the order statistic at rank q·(n − 1)."""
    v = np.sort(values)
    lo, hi = v[math.floor(q * (len(v) - 1))], v[math.ceil(q * (len(v) - 1))]
    return lo * (1 - SKETCH_ALPHA) - 1e-9 <= estimate <= hi * (1 + SKETCH_ALPHA) + 1e-9


def test_uniform_router_entropy_is_ln_e_and_margin_zero(synth):
    store, _ = synth
    ent = compute_metric(store, "entropy", "synth", layers=[0])
    assert np.allclose(ent["mean"], math.log(8), atol=1e-6)
    assert np.allclose(ent.uniform, math.log(8))
    assert np.allclose(compute_metric(store, "margin", "synth", layers=[0])["mean"], 0.0)


def test_collapsed_router_has_zero_entropy_and_full_margin(synth):
    store, _ = synth
    assert np.allclose(compute_metric(store, "entropy", "synth", layers=[1])["mean"], 0.0, atol=1e-6)
    assert np.allclose(compute_metric(store, "margin", "synth", layers=[1])["mean"], 1.0)


def test_entropy_z_and_margin_match_numpy_per_step(synth):
    store, steps = synth
    ls = [x for s in steps for x in s.layers if x.layer == 2]
    p = [x.probs_TE for x in ls]
    ent = compute_metric(store, "entropy", "synth", layers=[2])
    per_token = [-(q * np.log(q)).sum(1) for q in p]
    assert np.allclose(ent["mean"], [h.mean() for h in per_token], rtol=1e-5)
    for col, q in (("p05", 0.05), ("p50", 0.5), ("p95", 0.95)):  # from the rollup's sketch
        assert all(within_sketch(e, h, q) for e, h in zip(ent[col], per_token)), col
    exact = compute_metric(store, "entropy", "synth", layers=[2], exact=True)  # sorts the recorded rows
    assert np.allclose(exact.p50, [np.median(h) for h in per_token], rtol=1e-5)
    assert np.allclose(exact["mean"], ent["mean"]) and (exact.tokens == ent.tokens).all()
    # Each step was one frame of one rank: its rollup row holds the exact quantiles.
    assert np.allclose(ent[["p05", "p50", "p95"]], exact[["p05", "p50", "p95"]], rtol=1e-6)
    z = compute_metric(store, "z", "synth", layers=[2], by="window")
    lse = np.concatenate([np.log(np.exp(x.logits_TE).sum(1)) for x in ls])
    assert z["mean"].iloc[0] == pytest.approx((lse ** 2).mean(), rel=1e-5)
    assert within_sketch(z.p95.iloc[0], lse ** 2, 0.95)
    mg = compute_metric(store, "margin", "synth", layers=[2], by="window")
    top2 = np.concatenate([-np.sort(-q, 1)[:, :2] for q in p])
    assert mg["mean"].iloc[0] == pytest.approx((top2[:, 0] - top2[:, 1]).mean(), rel=1e-5)
    assert within_sketch(mg.p25.iloc[0], top2[:, 0] - top2[:, 1], 0.25)


def test_entropy_histogram_counts_every_token(synth):
    store, _ = synth
    h = compute_metric(store, "entropy", "synth", layers=[2], by="window", histogram=10)
    assert h.tokens.sum() == 4 * 128 and h.bin.between(0, 9).all() and (h.lo < h.hi).all()


def test_mean_only_entropy_equals_the_mean_of_the_full_distribution(synth):
    store, _ = synth
    full = compute_metric(store, "entropy", "synth")
    mean_only = compute_metric(store, "entropy", "synth", quantiles=False)
    assert "p50" not in mean_only.columns
    assert np.allclose(full["mean"], mean_only["mean"]) and (full.tokens == mean_only.tokens).all()
    with pytest.raises(ValueError, match="quantiles must be True or False"):
        compute_metric(store, "entropy", "synth", quantiles="no")


def test_exact_must_be_a_bool(synth):
    store, _ = synth
    with pytest.raises(ValueError, match="exact must be True or False"):
        compute_metric(store, "margin", "synth", exact="yes")
