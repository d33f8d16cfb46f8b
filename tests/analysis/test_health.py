"""Router health metrics from token_stats: entropy, z-loss, margin."""
import math

import numpy as np
import pytest

from moescope.analysis import compute_metric


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
    assert np.allclose(ent["mean"], [-(q * np.log(q)).sum(1).mean() for q in p], rtol=1e-5)
    assert np.allclose(ent.p50, [np.median(-(q * np.log(q)).sum(1)) for q in p], rtol=1e-5)
    z = compute_metric(store, "z", "synth", layers=[2], by="window")
    lse = np.concatenate([np.log(np.exp(x.logits_TE).sum(1)) for x in ls])
    assert z["mean"].iloc[0] == pytest.approx((lse ** 2).mean(), rel=1e-5)
    mg = compute_metric(store, "margin", "synth", layers=[2], by="window")
    top2 = np.concatenate([-np.sort(-q, 1)[:, :2] for q in p])
    assert mg["mean"].iloc[0] == pytest.approx((top2[:, 0] - top2[:, 1]).mean(), rel=1e-5)


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
