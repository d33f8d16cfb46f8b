"""Drift across checkpoints (saturation, last fluctuation, load JS) and expert alignment between models.

Synthetic runs hold probe-set replays next to training rows that reuse the same
checkpoint names and token ids: only the probe-set rows may count.
"""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from synth_runs import E, T, LayerStep, StepData, write_run  # noqa: E402
from moescope.analysis import compute_metric  # noqa: E402
from moescope.analysis.drift import js_divergence  # noqa: E402
from moescope.collector.store import UnknownProbeSet  # noqa: E402

PS = "ps"


def _pairs(rng):
    """Random distinct top-2 pairs, T of them."""
    return np.stack([rng.choice(E, 2, replace=False) for _ in range(T)])


def _step(step, ckpt, ids, experts_TK, probe_set=PS):
    probs = np.full((T, E), 1.0 / E)
    return StepData(step=step, checkpoint=ckpt, token_ids_T=ids, probe_set=probe_set,
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
    # Training batches under the same checkpoint names and token ids, routed at random:
    # matching them on (seq, pos) would give numbers; only the replays may count.
    training = [_step(s + 1, c, ids, _pairs(rng), probe_set=None) for c, s in ckpts]
    write_run(store, "drift", training + [_step(0, "c0", ids, first), _step(100, "c1", ids, mid),
                                          _step(200, "c2", ids, final)], {0: (E, 2)}, checkpoints=ckpts)
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
    assert sat.saturation.iloc[-1] == 1.0 and np.allclose(sat.baseline, 2 / E) and (sat.tokens == T).all()
    ref = compute_metric(store, "saturation", "drift", reference="c1", probe_set=PS)
    assert np.allclose(ref.saturation, [_overlap(ex[c], ex["c1"]) for c in ("c0", "c1", "c2")])
    with pytest.raises(ValueError, match="reference checkpoint 'nope' of run 'drift' has no replay of probe set 'ps'"):
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
    p, q = (np.bincount(ex[c].ravel(), minlength=E).astype(float) for c in ("c0", "c2"))
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2
    expected = 0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m))
    on_probe_set = compute_metric(store, "load_js", "drift", checkpoint_a="c0", checkpoint_b="c2", probe_set=PS)
    assert on_probe_set.js.iloc[0] == pytest.approx(expected)
    assert js_divergence(np.array([1.0, 0]), np.array([0, 1.0])) == pytest.approx(np.log(2))
    assert compute_metric(store, "load_js", "drift", checkpoint_a="c2", probe_set=PS).js.iloc[0] == pytest.approx(0.0)
    # Without a probe set, loads are every token the checkpoint saw (expert_step): training included.
    everything = compute_metric(store, "load_js", "drift", checkpoint_a="c0", checkpoint_b="c2")
    assert everything.js.iloc[0] != pytest.approx(expected)


def test_alignment_recovers_an_expert_permutation_between_models(drift):
    store, _, perm, _ = drift
    al = compute_metric(store, "alignment", "drift", checkpoint_a="c2", run_b="model-b")
    assert al.expert_b.tolist() == perm.tolist() and np.allclose(al.agreement, 1.0)
    assert al.tokens.iloc[0] == T and np.allclose(al.baseline, 1 / E)
    within = compute_metric(store, "alignment", "drift", checkpoint_a="c1", checkpoint_b="c2")
    assert within.agreement.iloc[0] == pytest.approx(0.75)  # a quarter of the tokens moved one expert over
    with pytest.raises(ValueError, match="two different models"):
        compute_metric(store, "alignment", "drift", checkpoint_a="c2")


def test_only_tokens_with_equal_ids_are_compared(store):
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 50, T)
    other = ids.copy()
    other[: T // 2] += 100  # the first half are different tokens at the same (seq, pos)
    a, b = _pairs(rng), _pairs(rng)
    write_run(store, "half", [_step(0, "c0", other, a), _step(10, "c1", ids, b)], {0: (E, 2)})
    sat = compute_metric(store, "saturation", "half")
    assert sat.tokens.tolist() == [T // 2, T]
    assert sat.saturation.iloc[0] == pytest.approx(_overlap(a[T // 2:], b[T // 2:]))


def test_checkpoints_sharing_no_probe_set_tokens_are_an_error_not_a_number(store):
    rng = np.random.default_rng(4)
    ids = rng.integers(0, 50, T)
    write_run(store, "apart", [_step(0, "c0", ids + 100, _pairs(rng)), _step(10, "c1", ids, _pairs(rng))], {0: (E, 2)})
    for name, kw in [("saturation", {}), ("fluctuation", {}), ("alignment", {"checkpoint_a": "c0", "checkpoint_b": "c1"}),
                     ("load_js", {"checkpoint_a": "c0", "checkpoint_b": "c1", "probe_set": PS})]:
        with pytest.raises(ValueError, match="share no tokens of probe set 'ps'") as info:
            compute_metric(store, name, "apart", **kw)
        assert "\n" not in str(info.value)


def test_probe_set_choice_errors_are_one_line(drift, store):
    store, _, _, _ = drift
    with pytest.raises(UnknownProbeSet, match="unknown probe set 'nope'; registered probe sets: none"):
        compute_metric(store, "saturation", "drift", probe_set="nope")
    rng = np.random.default_rng(0)
    write_run(store, "two", [_step(0, "c0", np.arange(T), _pairs(rng)),
                             _step(0, "c0", np.arange(T), _pairs(rng), probe_set="second")], {0: (E, 2)})
    with pytest.raises(ValueError, match=r"several probe sets \(ps, second\); choose one with probe_set="):
        compute_metric(store, "fluctuation", "two")
    write_run(store, "untouched", [_step(0, "t0", np.arange(T), _pairs(np.random.default_rng(0)), probe_set=None)],
              {0: (E, 2)})
    with pytest.raises(ValueError, match="run 'untouched' has no probe-set replays to compare") as info:
        compute_metric(store, "saturation", "untouched")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="probe set 'ps' was never replayed in run 'untouched'"):
        compute_metric(store, "alignment", "drift", run_b="untouched", probe_set="ps")


def test_a_window_with_no_probe_set_rows_is_an_error(drift):
    store, _, _, _ = drift
    for name in ("saturation", "fluctuation"):
        with pytest.raises(ValueError, match=r"no replay rows of probe set 'ps' in run 'drift', layers \[5\]"):
            compute_metric(store, name, "drift", layers=[5])
    with pytest.raises(ValueError, match=r"no replay rows of probe set 'ps' in run 'drift', steps 1000..2000"):
        compute_metric(store, "saturation", "drift", steps=(1000, 2000))
    with pytest.raises(ValueError, match="share no tokens of probe set 'ps'"):
        compute_metric(store, "alignment", "drift", checkpoint_a="c0", checkpoint_b="c2", phase="eval")
