"""Collapse detection: planted collapses are found at the right layer and step; healthy runs get no verdict."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from moescope.analysis.collapse import LayerSeries, Settings, judge
from moescope.kernels import MoEConfig, ModelConfig, MoETransformer, route
from moescope.kernels.params import RouterParams
from moescope.probe import attach

STEPS, ONSET = 40, 20


def tiny_reference(seed: int = 0) -> MoETransformer:
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, ffn_size=64, max_seq_len=32,
                      moe=MoEConfig(num_experts=8, top_k=2, score="softmax"))
    return MoETransformer.from_config(cfg, seed=seed)


def train_reference(store, run: str, plant=None, seed: int = 0) -> None:
    """Train the tiny reference MoE for STEPS steps; `plant(step, routers)` may set logit biases."""
    model = tiny_reference(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    routers = [block.router for block in model.moe_blocks()]
    with attach(model, sink=f"local:{store.root}", run=run, frame_interval_s=1e6) as probe:
        for step in range(STEPS):
            if plant is not None:
                plant(step, routers)
            probe.set_step(step)
            ids = torch.randint(0, 64, (8, 32), generator=generator)
            model(ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def collapse_verdicts(store, run):
    df = store.metric("collapse", run=run)
    return {int(r.layer): r for r in df.itertuples()}


def test_zero_logit_bias_leaves_the_router_bit_identical():
    g = torch.Generator().manual_seed(0)
    cfg = MoEConfig(num_experts=8, top_k=2, capacity_factor=1.25)
    params = RouterParams(router_weight_ED=torch.randn(8, 16, generator=g), router_bias_E=torch.zeros(8))
    x_TD = torch.randn(64, 16, generator=g)
    plain, zero = route(x_TD, params, cfg), route(x_TD, params, cfg, logit_bias_E=torch.zeros(8))
    for name in ("logits_TE", "probs_TE", "expert_ids_TK", "weights_TK", "dropped_TK", "entropy_T", "margin_T"):
        assert torch.equal(getattr(plain, name), getattr(zero, name)), name
    biased = route(x_TD, params, cfg, logit_bias_E=torch.tensor([0, 0, 0, 50.0, 0, 0, 0, 0]))
    assert (biased.expert_ids_TK[:, 0] == 3).all()


def test_reference_model_router_buffer_is_not_saved_and_steers_routing():
    model = tiny_reference()
    router = model.moe_blocks()[1].router
    assert not any("logit_bias_E" in key for key in model.state_dict())
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    seen = []
    handle = router.register_forward_hook(lambda m, a, out: seen.append(out.expert_ids_TK))
    with torch.no_grad():
        model(ids)
        router.logit_bias_E[5] = 40.0
        model(ids)
    handle.remove()
    assert not (seen[0][:, 0] == 5).all() and (seen[1][:, 0] == 5).all()


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory):
    from moescope.analysis.store import AnalysisStore as Store

    store = Store(tmp_path_factory.mktemp("collapse") / "store")

    def take_over(step, routers):
        if step == ONSET:
            routers[1].logit_bias_E[3] = 3.0

    train_reference(store, "healthy", None)
    train_reference(store, "planted", take_over)
    yield store
    store.close()


def test_planted_takeover_in_the_reference_model_is_found_at_its_layer_and_step(reference_runs):
    verdicts = collapse_verdicts(reference_runs, "planted")
    hit = verdicts[1]
    assert hit.verdict in ("collapsing", "collapsed")
    assert abs(hit.onset_step - ONSET) <= 2
    assert 3 in hit.evidence_experts and hit.evidence_roles[hit.evidence_experts.index(3)] == "took_over"
    assert hit.entropy_after < hit.entropy_before  # a sharper router after the onset
    assert verdicts[0].verdict not in ("collapsing", "collapsed")


def test_healthy_reference_run_gets_no_collapse_verdict(reference_runs):
    verdicts = collapse_verdicts(reference_runs, "healthy")
    assert {v.verdict for v in verdicts.values()} <= {"healthy", "imbalanced"}
    assert all(pd.isna(v.onset_step) for v in verdicts.values())


def test_evidence_rows_carry_the_share_trajectory_around_the_onset(reference_runs):
    ev = reference_runs.metric("collapse", run="planted", detail="evidence")
    row = ev[(ev.layer == 1) & (ev.expert == 3)].iloc[0]
    steps, share = row.trajectory_steps, row.trajectory_share
    assert steps[0] < row.onset_step <= steps[-1] and len(steps) == len(share)
    before = [s for t, s in zip(steps, share) if t < row.onset_step]
    after = [s for t, s in zip(steps, share) if t >= row.onset_step]
    assert np.mean(after) > 2 * np.mean(before)
    assert row.share_after > row.share_before


def test_step_series_marks_segments_and_the_onset(reference_runs):
    df = reference_runs.metric("collapse", run="planted", by="step", layers=[1])
    assert set(df.layer) == {1} and df.step.tolist() == list(range(STEPS))
    onset = int(df[df.after_onset].step.min())
    assert abs(onset - ONSET) <= 2
    assert df[df.after_onset].divergence.mean() > df[~df.after_onset].divergence.mean()


def test_planted_bias_on_a_tiny_mixtral_is_found_at_its_layer_and_step(store):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                                     num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    gate = model.model.layers[1].mlp.gate
    bias_E = torch.zeros(8)

    def add_bias(module, args, output):  # the router's own rule, on biased logits
        logits = output[0] + bias_E
        weights, ids = torch.softmax(logits.float(), -1).topk(module.top_k, -1)
        return logits, weights / weights.sum(-1, keepdim=True), ids

    handle = gate.register_forward_hook(add_bias)  # registered first: the probe sees the biased decision
    generator = torch.Generator().manual_seed(0)
    with attach(model, sink=f"local:{store.root}", run="mixtral", frame_interval_s=1e6) as probe, torch.no_grad():
        for step in range(STEPS):
            bias_E[6] = 0.5 if step >= ONSET else 0.0
            probe.set_step(step)
            model(torch.randint(0, 64, (4, 16), generator=generator))
    handle.remove()
    verdicts = collapse_verdicts(store, "mixtral")
    assert verdicts[1].verdict in ("collapsing", "collapsed") and abs(verdicts[1].onset_step - ONSET) <= 2
    assert 6 in verdicts[1].evidence_experts
    assert verdicts[0].verdict not in ("collapsing", "collapsed")


def series(util_NE: np.ndarray, k: int = 2, tokens: int = 4096) -> LayerSeries:
    """A layer whose per-step load is `util_NE` (utilisation per expert) times the fair share, plus noise."""
    rng = np.random.default_rng(0)
    n, e = util_NE.shape
    share_NE = util_NE / util_NE.sum(1, keepdims=True)
    load_NE = np.stack([rng.multinomial(tokens * k, p) for p in share_NE]).astype(float)
    return LayerSeries(0, k, np.arange(n) * 10, load_NE, np.full(n, 1.5), np.full(n, 0.2))


def test_slow_starvation_onset_is_where_the_decline_starts_not_a_threshold_crossing():
    util_NE = np.ones((100, 8))
    util_NE[50:, 4] = np.clip(1 - 0.04 * np.arange(50), 0, None)  # reaches 0.1 at row 72
    v = judge(series(util_NE))
    assert v.verdict in ("collapsing", "collapsed")
    onset_row = v.onset_index
    assert 50 <= onset_row <= 62
    assert [e.expert for e in v.evidence] == [4] and v.evidence[0].role == "starved"


def test_layer_collapsed_from_its_first_step_is_collapsed_with_that_onset(synth):
    store, steps = synth
    verdicts = collapse_verdicts(store, "synth")
    assert verdicts[1].verdict == "collapsed" and verdicts[1].onset_step == steps[0].step
    assert verdicts[0].verdict == "healthy"


def test_stable_imbalance_is_imbalanced_without_onset():
    util_NE = np.ones((60, 8))
    util_NE[:, 0] = 3.0
    v = judge(series(util_NE))
    assert v.verdict == "imbalanced" and v.onset_index is None and v.dominant_now == [0]


def test_layer_hovering_at_the_dominant_threshold_does_not_flip_to_collapsing():
    util_NE = np.ones((60, 8))
    util_NE[:30, 0], util_NE[30:, 0] = 2.03, 2.655  # utilisation 1.8, then 2.2 after normalising
    v = judge(series(util_NE))
    assert v.verdict == "imbalanced" and v.dominant_now == [0]


@pytest.mark.parametrize("kw, msg", [
    ({"detail": "experts"}, "detail must be one of"),
    ({"starved": 0}, "starved must be a positive number"),
    ({"dominant": 0.5}, "need starved < 1 < dominant"),
    ({"min_segment": 0}, "min_segment must be a positive int"),
    ({"threshold": 0.1}, "does not take option"),
])
def test_bad_collapse_options_are_one_line_value_errors(synth, kw, msg):
    store, _ = synth
    with pytest.raises(ValueError, match=msg):
        store.metric("collapse", run="synth", **kw)


def test_settings_reject_non_numbers():
    with pytest.raises(ValueError, match="penalty must be a positive number"):
        Settings(penalty="high")


def test_long_run_is_bucketed_and_the_onset_placed_at_full_resolution():
    util_NE = np.ones((1200, 8))
    util_NE[703:, 2] = 7.0  # share 7/14: expert 2 in every token's top-2 from row 703
    v = judge(series(util_NE))
    assert v.verdict == "collapsed" and v.onset_index == 703
    assert v.segments[-1].hi == 1200 and [e.expert for e in v.evidence if e.role == "took_over"] == [2]


def test_pelt_finds_the_segmentation_ruptures_finds():
    """The vectorised PELT equals ruptures.Pelt (l2 cost, jump 1) on random signals with shifts and ties."""
    import math

    import ruptures

    from moescope.analysis.collapse import pelt

    rng = np.random.default_rng(7)
    for _ in range(120):
        n, d, m = int(rng.integers(2, 200)), int(rng.integers(1, 12)), int(rng.integers(1, 8))
        x = rng.normal(size=(n, d))
        for _ in range(int(rng.integers(0, 4))):
            x[int(rng.integers(0, n)):] += rng.normal(size=d) * rng.uniform(0, 4)
        if rng.random() < 0.2:
            x = np.round(x)  # equal costs: the first minimum must win, as in ruptures
        pen = (d + 1) * math.log(n) * rng.uniform(0.2, 2)
        try:
            want = ruptures.Pelt(model="l2", min_size=m, jump=1).fit(x).predict(pen=pen)
        except ruptures.exceptions.BadSegmentationParameters:
            continue
        assert pelt(x, pen, m) == want, (n, d, m)


def test_noise_levels_of_all_columns_at_once_equal_each_columns_median_absolute_deviation():
    from moescope.analysis.collapse import _MAD_TO_SD, _noise

    def one(x):  # the definition, one column at a time
        d = np.diff(x)
        d = d[np.isfinite(d) & (d != 0)]
        return 0.0 if d.size < 2 else _MAD_TO_SD * np.median(np.abs(d - np.median(d))) / np.sqrt(2)

    rng = np.random.default_rng(5)
    for _ in range(300):
        n, c = int(rng.integers(1, 30)), int(rng.integers(1, 8))
        x = rng.normal(size=(n, c)).round(int(rng.integers(0, 3)))  # rounding makes ties and zero changes
        x[rng.random((n, c)) < 0.2] = np.nan
        x[:, rng.random(c) < 0.2] = 0.0  # dead experts
        assert np.array_equal(_noise(x), [one(x[:, j]) for j in range(c)])
