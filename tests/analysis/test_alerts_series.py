"""The series a rule watches equals the metric the charts show; replay agrees with live evaluation;
a planted collapse fires within one window, reaches a real webhook on loopback and resolves after recovery."""
import sys
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from synth_runs import E, StepData, T, collapsed_layer, make_layer_tables, random_layer, write_run  # noqa: E402
from moescope.analysis import alerts, compute_metric  # noqa: E402
from moescope.frame import Frame  # noqa: E402
from test_alerts import hook, hook_server  # noqa: E402,F401 - the loopback webhook receiver

# Recorded steps with gaps, so "the last N steps" is a range of step numbers, not of rows.
STEPS = [0, 1, 2, 4, 5, 7, 8, 9, 12, 13]
STEP_COLUMN = {"maxvio": "maxvio", "dead_experts": "dead", "drop_rate": "drop_rate", "entropy": "mean", "cv": "cv"}
WINDOW_COLUMN = {**STEP_COLUMN, "maxvio": "maxvio_global"}


@pytest.fixture
def varied(store):
    """Run "varied": layers 0 and 1 random top-2 routers with capacity drops, a different draw every step."""
    rng = np.random.default_rng(7)
    steps = []
    for step in STEPS:
        s = StepData(step=step, checkpoint="c0", token_ids_T=rng.integers(0, 6, T))
        s.layers = [random_layer(0, rng, capacity_factor=0.6 + 0.1 * (step % 3)), random_layer(1, rng, 0.8)]
        if step in (4, 5):  # expert 7 of layer 1 starves for two steps: dead-expert counts move
            s.layers[1].experts_TK = np.where(s.layers[1].experts_TK == 7, 6, s.layers[1].experts_TK)
        steps.append(s)
    write_run(store, "varied", steps, {0: (E, 2), 1: (E, 2)})
    return store


def _rule(metric, aggregation="window", layer=None, expert=None, window_steps=1, ema_alpha=None):
    return {"id": 0, "name": "r", "metric": metric, "layer": layer, "expert": expert, "aggregation": aggregation,
            "window_steps": window_steps, "ema_alpha": ema_alpha, "comparison": ">", "threshold": 0.5,
            "for_evaluations": 1, "webhook": None}


def _combine(metric, values):
    return sum(values) if metric == "dead_experts" else sum(values) / len(values)


@pytest.mark.parametrize("metric", alerts.ALERT_METRICS)
@pytest.mark.parametrize("layer", [None, 1])
def test_per_step_series_is_compute_metric_by_step(varied, metric, layer):
    got = alerts.rule_series(varied, _rule(metric, "step", layer=layer), "varied")
    opts = {"quantiles": False} if metric == "entropy" else {}
    want = compute_metric(varied, metric, "varied", layers=None if layer is None else [layer], by="step", **opts)
    per_step = want.groupby("step")[STEP_COLUMN[metric]].apply(lambda v: _combine(metric, list(v)))
    assert list(got.step) == STEPS
    assert list(got.value) == pytest.approx(list(per_step), rel=1e-9)
    assert (got.threshold == 0.5).all() and list(got.holds) == [v > 0.5 for v in got.value]


@pytest.mark.parametrize("metric", alerts.ALERT_METRICS)
def test_rolling_window_series_is_compute_metric_over_each_window(varied, metric):
    got = alerts.rule_series(varied, _rule(metric, "window", window_steps=3), "varied")
    opts = {"quantiles": False} if metric == "entropy" else {}
    for s, value in zip(got.step, got.value):
        df = compute_metric(varied, metric, "varied", steps=(s - 2, s), by="window", **opts)
        assert value == pytest.approx(_combine(metric, list(df[WINDOW_COLUMN[metric]])), rel=1e-9), s


@pytest.mark.parametrize("metric", ["maxvio", "dead_experts", "drop_rate"])
def test_expert_scope_series_is_that_experts_share_of_the_window(varied, metric):
    got = alerts.rule_series(varied, _rule(metric, "window", layer=1, expert=7, window_steps=2), "varied")
    for s, value in zip(got.step, got.value):
        share = compute_metric(varied, "load_share", "varied", layers=[1], steps=(s - 1, s), by="window")
        row = share[share.expert == 7].iloc[0]
        if metric == "maxvio":
            want = row.share / row.uniform - 1
        elif metric == "dead_experts":
            want = float(row.load == 0)
        else:
            d = varied.sql("SELECT sum(dropped) / sum(tokens) AS v FROM expert_step WHERE layer = 1 AND expert = 7 "
                           "AND step BETWEEN ? AND ?", [int(s - 1), int(s)], run="varied")
            want = d.v.iloc[0]
        assert value == pytest.approx(want, rel=1e-9), s
    if metric == "drop_rate":  # no load at all in the window: no drop rate, so no point
        assert 5 not in set(got.step)
    if metric == "dead_experts":
        assert dict(zip(got.step, got.value))[5] == 1.0  # starved at 4 and 5: dead over the window (4, 5)


def test_ema_series_is_the_moving_average_of_the_per_step_series(varied):
    per_step = alerts.rule_series(varied, _rule("maxvio", "step"), "varied")
    got = alerts.rule_series(varied, _rule("maxvio", "ema", ema_alpha=0.3), "varied")
    ema, want = None, []
    for x in per_step.value:
        ema = x if ema is None else 0.3 * x + 0.7 * ema
        want.append(ema)
    assert list(got.value) == pytest.approx(want, rel=1e-12)
    tail = alerts.rule_series(varied, _rule("maxvio", "ema", ema_alpha=0.3), "varied", steps=(8, 12))
    assert list(tail.step) == [8, 9, 12] and list(tail.value) == pytest.approx(want[6:9], rel=1e-12)


def test_series_of_an_unknown_run_or_rule_is_a_clear_error(varied):
    with pytest.raises(ValueError, match="unknown run 'nope'"):
        alerts.rule_series(varied, _rule("cv"), "nope")
    with pytest.raises(ValueError, match="no alert rule 'missing'"):
        alerts.rule_series(varied, "missing", "varied")


# ------------------------------------------------------------------ planted collapse, live and replayed
COLLAPSE_FROM, RECOVER_FROM, LAST = 10, 20, 28


def _planted_step(step, rng):
    s = StepData(step=step, checkpoint="c0", token_ids_T=rng.integers(0, 6, T))
    collapsed = COLLAPSE_FROM <= step < RECOVER_FROM
    s.layers = [random_layer(0, rng), collapsed_layer(1) if collapsed else random_layer(1, rng)]
    if not collapsed:  # keep layer 1 top-1 like the collapsed one
        s.layers[1].experts_TK = s.layers[1].experts_TK[:, :1]
        s.layers[1].dropped_TK = s.layers[1].dropped_TK[:, :1]
    return s


def _write(store, steps):
    """Each step as its own frame (sequence number = step), as a live probe sends them."""
    meta = {"layers": [{"layer": 0, "module_path": "l0", "num_experts": E, "top_k": 2, "router_kind": "softmax"},
                       {"layer": 1, "module_path": "l1", "num_experts": E, "top_k": 1, "router_kind": "softmax"}]}
    for s in steps:
        parts = [make_layer_tables("planted", s, ls) for ls in s.layers]
        tables = {n: pa.concat_tables([p[n] for p in parts]) for n in ("routing", "token_stats", "expert_step")}
        store.write_frame(Frame(run="planted", producer="planted-p", seq=s.step, tables=tables,
                                frame_id=uuid.uuid4().hex, meta=meta))
    steps.clear()


def test_planted_collapse_fires_within_one_window_reaches_the_webhook_and_resolves(store, hook):
    url, received = hook
    rng = np.random.default_rng(3)
    window = 4
    _write(store, [_planted_step(0, rng)])
    rule = alerts.add_rule(store, "collapse", "entropy", "<", 0.5, run="planted", layer=1, window_steps=window,
                           webhook=url)
    live, pending = [], []
    for step in range(1, LAST + 1):
        pending.append(_planted_step(step, rng))
        if step % 3 == 0 or step == LAST:  # an evaluation every third step, as beat would run
            _write(store, pending)
            live += alerts.evaluate_alerts(store)
    assert [e["state"] for e in live] == ["firing", "resolved"]
    fired, resolved = live
    assert COLLAPSE_FROM <= fired["step"] <= COLLAPSE_FROM + window - 1  # within one evaluation window
    assert RECOVER_FROM <= resolved["step"] <= RECOVER_FROM + window - 1
    assert [(b["state"], b["step"]) for b in received] == [("firing", fired["step"]), ("resolved", resolved["step"])]
    assert received[0]["evidence"]["steps"] == [fired["step"] - window + 1, fired["step"]]
    assert all(e["notified"] for e in alerts.list_events(store, rule_id=rule["id"]))
    # Replaying the recorded history gives the same transitions at the same steps and values.
    replayed = alerts.replay(store, rule, "planted")
    assert [(e["state"], e["step"], e["value"]) for e in replayed] == [(e["state"], e["step"], e["value"]) for e in live]


@pytest.mark.parametrize("aggregation, extra, for_evaluations", [
    ("step", {}, 1), ("window", {"window_steps": 3}, 2), ("ema", {"ema_alpha": 0.4}, 2), ("ema", {"ema_span": 5}, 1)])
def test_replay_agrees_with_live_evaluation_step_by_step(store, aggregation, extra, for_evaluations):
    rng = np.random.default_rng(11)
    _write(store, [_planted_step(0, rng)])
    rule = alerts.add_rule(store, "dead", "dead_experts", ">=", E // 2, run="planted", layer=1,
                           aggregation=aggregation, for_evaluations=for_evaluations, **extra)
    live, pending = [], []
    for step in range(1, LAST + 1):
        pending.append(_planted_step(step, rng))
        if step % 2 == 0 or step in (11, 12, 13):  # sometimes every step, sometimes two at once
            _write(store, pending)
            live += alerts.evaluate_alerts(store)
    _write(store, pending)
    live += alerts.evaluate_alerts(store)
    replayed = alerts.replay(store, rule, "planted")
    assert [e["state"] for e in replayed] == ["firing", "resolved"]
    assert [(e["state"], e["step"], e["value"]) for e in replayed] == [(e["state"], e["step"], e["value"]) for e in live]
    series = alerts.rule_series(store, rule, "planted")
    firing_step = replayed[0]["step"]
    # It fires at the for_evaluations-th consecutive breaching step of the series.
    holds = dict(zip(series.step, series.holds))
    assert all(holds[s] for s in range(firing_step - for_evaluations + 1, firing_step + 1))
