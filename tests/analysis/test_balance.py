"""Balance metrics from expert_step against closed forms and direct numpy computation."""
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from synth_runs import E, T, StepData, random_layer, uniform_layer, write_run
from moescope.analysis import compute_metric  # noqa: E402


def _layer(steps, layer):
    return [ls for s in steps for ls in s.layers if ls.layer == layer]


def test_uniform_layer_has_switch_score_one_and_no_violation(synth):
    store, _ = synth
    sw = compute_metric(store, "switch_score", "synth", layers=[0])
    assert np.allclose(sw.switch_score, 1.0)
    mv = compute_metric(store, "maxvio", "synth", layers=[0])
    assert np.allclose(mv.maxvio, 0.0)
    assert np.allclose(compute_metric(store, "cv", "synth", layers=[0]).cv, 0.0)
    share = compute_metric(store, "load_share", "synth", layers=[0], by="window")
    assert np.allclose(share.share, 1 / E) and len(share) == E
    assert np.allclose(compute_metric(store, "utilisation", "synth", layers=[0]).utilisation, 1.0)


def test_collapsed_layer_has_all_but_one_expert_dead(synth):
    store, _ = synth
    dead = compute_metric(store, "dead_experts", "synth", layers=[1])
    assert dead.dead.tolist() == [E - 1]
    assert dead.dead_ids.iloc[0].tolist() == list(range(1, E))
    assert dead.dead_fraction.iloc[0] == pytest.approx((E - 1) / E)
    assert dead.starved.iloc[0] == E - 1
    mv = compute_metric(store, "maxvio", "synth", layers=[1])
    assert np.allclose(mv.maxvio, E - 1)  # (T − T/E) / (T/E)
    sw = compute_metric(store, "switch_score", "synth", layers=[1])
    assert np.allclose(sw.switch_score, E, rtol=1e-6)  # f_0 = P_0 = 1


def test_random_layer_metrics_match_numpy(synth):
    store, steps = synth
    ls = _layer(steps, 2)
    load_SE = np.stack([np.bincount(x.experts_TK.ravel(), minlength=E) for x in ls]).astype(float)
    top1_SE = np.stack([np.bincount(x.experts_TK[:, 0], minlength=E) for x in ls]) / T
    prob_SE = np.stack([x.probs_TE.mean(0) for x in ls])
    mv = compute_metric(store, "maxvio", "synth", layers=[2])
    expected = (load_SE.max(1) - load_SE.mean(1)) / load_SE.mean(1)
    assert np.allclose(mv.maxvio, expected)
    assert mv.step.tolist() == [0, 10, 20, 30]
    sw = compute_metric(store, "switch_score", "synth", layers=[2])
    assert np.allclose(sw.switch_score, E * (top1_SE * prob_SE).sum(1))
    assert np.allclose(compute_metric(store, "cv", "synth", layers=[2]).cv, load_SE.std(1) / load_SE.mean(1))
    window = load_SE.sum(0)
    g = compute_metric(store, "maxvio", "synth", layers=[2], by="window")
    assert g.maxvio_global.iloc[0] == pytest.approx((window.max() - window.mean()) / window.mean())
    assert g.maxvio_batch_mean.iloc[0] == pytest.approx(expected.mean())
    util = compute_metric(store, "utilisation", "synth", layers=[2], by="window")
    assert np.allclose(util.utilisation, window / (4 * T * 2 / E))


def test_maxvio_is_averaged_over_layers(synth):
    store, _ = synth
    mv = compute_metric(store, "maxvio", "synth", layers=[0, 1, 2])
    per_step = mv.groupby("step").maxvio.mean()
    assert np.allclose(mv.maxvio_mean_layers, mv.step.map(per_step))
    g = compute_metric(store, "maxvio", "synth", by="window")
    assert g.maxvio_global_mean_layers.iloc[0] == pytest.approx(g.maxvio_global.mean())


def test_drop_rate_matches_recorded_drops_and_rises_towards_the_end(synth):
    store, steps = synth
    ls = _layer(steps, 2)
    dr = compute_metric(store, "drop_rate", "synth", layers=[2], by="window")
    assert dr.drop_rate.iloc[0] == pytest.approx(np.mean([x.dropped_TK.mean() for x in ls]))
    pos = compute_metric(store, "drop_rate", "synth", layers=[2], by="window", position_buckets=4)
    assert pos.bucket.tolist() == [0, 1, 2, 3] and pos.slots.sum() == 4 * T * 2
    # Earlier positions claimed capacity first in the fixture, so later ones drop more.
    assert pos.drop_rate.iloc[-1] > pos.drop_rate.iloc[0]


def test_predicted_drops_replay_equals_recorded_drops_at_the_recorded_capacity(synth):
    store, _ = synth
    pd_ = compute_metric(store, "predicted_drops", "synth", layers=[2], capacity_factors=[1.0, 2.0, 100.0])
    at1 = pd_[pd_.capacity_factor == 1.0].iloc[0]
    assert at1.predicted_dropped == at1.recorded_dropped > 0
    assert pd_[pd_.capacity_factor == 100.0].predicted_dropped.iloc[0] == 0
    assert pd_[pd_.capacity_factor == 2.0].predicted_dropped.iloc[0] < at1.predicted_dropped


def test_balance_comes_from_expert_step_even_when_routing_rows_are_sampled(store):
    rng = np.random.default_rng(7)
    steps = [StepData(step=0, checkpoint="c0", token_ids_T=rng.integers(0, 6, T), layers=[random_layer(0, rng)])]
    write_run(store, "sampled", steps, {0: (E, 2)}, routing_rows=np.arange(0, T, 8))
    assert store.sql("SELECT count(*) AS n FROM routing", run="sampled").n[0] == T // 8 * 2
    share = compute_metric(store, "load_share", "sampled")
    expected = np.bincount(steps[0].layers[0].experts_TK.ravel(), minlength=E)
    assert share.load.tolist() == expected.tolist()


def test_repeated_expert_step_keys_are_summed(store):
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 6, T)
    # Two frames for the same step (e.g. two microbatches): loads add up.
    steps = [StepData(step=5, checkpoint="c0", token_ids_T=ids, layers=[uniform_layer(0)]) for _ in range(2)]
    write_run(store, "twice", steps, {0: (E, 2)})
    share = compute_metric(store, "load_share", "twice")
    assert share.step.unique().tolist() == [5] and np.allclose(share.load, 2 * T * 2 / E)
    assert compute_metric(store, "utilisation", "twice").tokens.iloc[0] == 2 * T


def test_steps_and_layers_filter_the_window(synth):
    store, _ = synth
    mv = compute_metric(store, "maxvio", "synth", layers=[2, 0], steps=(10, 20))
    assert sorted(mv.step.unique()) == [10, 20] and sorted(mv.layer.unique()) == [0, 2]
    assert compute_metric(store, "maxvio", "synth", steps=(1000, 2000)).empty


def test_load_arrays_hold_load_shares_loads_per_step_and_expert(synth):
    from moescope.analysis import balance
    from moescope.analysis.query import layer_meta, make_scope

    store, _ = synth
    meta = layer_meta(store, "synth")
    for layers in (None, [1, 2]):
        scope = make_scope("synth", layers=layers, by="step")
        arrays = balance.load_arrays(store, scope, meta)
        share = balance.load_share(store, scope, meta)
        assert sorted(arrays) == sorted(share.layer.unique())
        for layer, (steps, load_NE) in arrays.items():
            table = share[share.layer == layer].pivot(index="step", columns="expert", values="load").fillna(0.0)
            table = table[table.sum(axis=1) > 0]
            assert steps.tolist() == table.index.tolist()
            assert np.array_equal(load_NE, table.to_numpy())


@pytest.mark.parametrize("by", ["step", "window"])
def test_balance_holds_each_of_its_metrics_as_that_metric_computes_it(synth, by):
    store, _ = synth
    both = compute_metric(store, "balance", "synth", by=by)
    keys = ["step", "layer"] if by == "step" else ["layer"]
    for metric, columns in {"cv": ["cv"], "switch_score": ["switch_score", "tokens"],
                            "drop_rate": ["slots", "dropped", "drop_rate"]}.items():
        alone = compute_metric(store, metric, "synth", by=by)
        # Equal up to the order DuckDB sums in (a parallel aggregate may add in another order).
        pd.testing.assert_frame_equal(both[keys + columns], alone[keys + columns], rtol=1e-12)
    if by == "step":  # maxvio's own by-step frame adds the mean over layers
        pd.testing.assert_frame_equal(both[keys + ["maxvio"]],
                                      compute_metric(store, "maxvio", "synth", by=by)[keys + ["maxvio"]], rtol=1e-12)
