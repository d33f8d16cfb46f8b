"""Drift across checkpoints (saturation, last fluctuation, load JS) and expert alignment between models."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from synth_runs import E, T, LayerStep, StepData, write_run  # noqa: E402
from moescope.analysis import compute_metric  # noqa: E402
from moescope.analysis.drift import js_divergence  # noqa: E402


def _pairs(rng):
    """Random distinct top-2 pairs, T of them."""
    return np.stack([rng.choice(E, 2, replace=False) for _ in range(T)])


def _step(step, ckpt, ids, experts_TK):
    probs = np.full((T, E), 1.0 / E)
    return StepData(step=step, checkpoint=ckpt, token_ids_T=ids,
                    layers=[LayerStep(0, experts_TK, probs, np.zeros((T, 2), bool), np.zeros((T, E)))])


@pytest.fixture
def drift(store):
    rng = np.random.default_rng(99)
    ids = rng.integers(0, 50, T)
    final = _pairs(rng)
    mid = final.copy()
    changed = np.arange(T) % 4 == 0
    mid[changed] = (mid[changed] + 1) % E
    first = _pairs(rng)
    ckpts = [("c0", 0), ("c1", 100), ("c2", 200)]
    write_run(store, "drift", [_step(0, "c0", ids, first), _step(100, "c1", ids, mid), _step(200, "c2", ids, final)],
              {0: (E, 2)}, checkpoints=ckpts)
    perm = rng.permutation(E)
    write_run(store, "model-b", [_step(0, "b0", ids, perm[final])], {0: (E, 2)}, checkpoints=[("b0", 0)])
    return store, {"c0": first, "c1": mid, "c2": final}, perm, changed


def _overlap(a, b):
    return np.mean([len(set(x) & set(y)) / 2 for x, y in zip(a, b)])


def test_saturation_against_final_and_chosen_reference(drift):
    store, ex, _, _ = drift
    sat = compute_metric(store, "saturation", "drift")
    assert sat.checkpoint.tolist() == ["c0", "c1", "c2"] and sat.step.tolist() == [0, 100, 200]
    assert np.allclose(sat.saturation, [_overlap(ex[c], ex["c2"]) for c in ("c0", "c1", "c2")])
    assert sat.saturation.iloc[-1] == 1.0 and np.allclose(sat.baseline, 2 / E)
    ref = compute_metric(store, "saturation", "drift", reference="c1")
    assert np.allclose(ref.saturation, [_overlap(ex[c], ex["c1"]) for c in ("c0", "c1", "c2")])
    with pytest.raises(ValueError, match="unknown reference checkpoint 'nope'"):
        compute_metric(store, "saturation", "drift", reference="nope")


def test_last_fluctuation_cdf_per_token(drift):
    store, ex, _, changed = drift
    fl = compute_metric(store, "fluctuation", "drift")
    top1 = {c: v[:, 0] for c, v in ex.items()}
    last = np.full(T, -1)
    for i, c in enumerate(("c0", "c1", "c2")):
        last[top1[c] != top1["c2"]] = i
    assert fl.last_fluctuations.tolist() == [(last == i).sum() for i in range(3)]
    assert fl.never.iloc[0] == (last == -1).sum()
    assert np.allclose(fl.cdf, [(last <= i).mean() for i in range(3)]) and fl.cdf.iloc[-1] == 1.0
    assert fl.last_fluctuations.iloc[1] == changed.sum()  # every shifted token differs at c1


def test_load_js_between_checkpoints_matches_numpy(drift):
    store, ex, _, _ = drift
    js = compute_metric(store, "load_js", "drift", checkpoint_a="c0", checkpoint_b="c2")
    p, q = (np.bincount(ex[c].ravel(), minlength=E).astype(float) for c in ("c0", "c2"))
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2
    expected = 0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m))
    assert js.js.iloc[0] == pytest.approx(expected)
    assert js_divergence(np.array([1.0, 0]), np.array([0, 1.0])) == pytest.approx(np.log(2))
    assert compute_metric(store, "load_js", "drift", checkpoint_a="c2").js.iloc[0] == pytest.approx(0.0)


def test_alignment_recovers_an_expert_permutation_between_models(drift):
    store, _, perm, _ = drift
    al = compute_metric(store, "alignment", "drift", checkpoint_a="c2", run_b="model-b")
    assert al.expert_b.tolist() == perm.tolist() and np.allclose(al.agreement, 1.0)
    assert al.tokens.iloc[0] == T and np.allclose(al.baseline, 1 / E)
    within = compute_metric(store, "alignment", "drift", checkpoint_a="c1", checkpoint_b="c2")
    assert within.agreement.iloc[0] == pytest.approx(0.75)  # a quarter of the tokens moved one expert over
    with pytest.raises(ValueError, match="two different models"):
        compute_metric(store, "alignment", "drift", checkpoint_a="c2")
