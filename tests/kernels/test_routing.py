"""route() against a slow, obviously-correct per-token / per-expert loop."""
import math

import pytest
import torch

from moescope.kernels import MoEConfig, MoEParams, RouterParams, route

D = 12


def make(cfg, T=40, seed=0, bias_scale=0.0):
    g = torch.Generator().manual_seed(seed)
    params = MoEParams.init(cfg, D, 16, generator=g)
    if bias_scale:
        params.router_bias_E = torch.randn(cfg.num_experts, generator=g) * bias_scale
    x_TD = torch.randn(T, D, generator=g)
    return x_TD, params


def loop_route(x_TD, params, cfg, valid=None):
    """One token at a time, plain Python lists; the definition the vectorised router must match."""
    T, E, k = x_TD.shape[0], cfg.num_experts, cfg.top_k
    valid = [True] * T if valid is None else [bool(v) for v in valid]
    logits = (x_TD.double() @ params.router_weight_ED.double().T).tolist()
    bias = params.router_bias_E.double().tolist()
    rows = []
    for t in range(T):
        if cfg.score == "softmax":
            m = max(logits[t])
            ex = [math.exp(v - m) for v in logits[t]]
            scores = [v / sum(ex) for v in ex]
        else:
            scores = [1 / (1 + math.exp(-v)) for v in logits[t]]
        rows.append(scores)
    n_real = sum(valid)
    ids, weights, dropped = [], [], []
    if cfg.routing == "token_choice":
        for t in range(T):
            sel = sorted(range(E), key=lambda e: -(rows[t][e] + bias[e]))[:k]
            w = [rows[t][e] for e in sel]
            if cfg.normalize_topk:
                w = [v / sum(w) for v in w]
            pairs = sorted(zip(w, sel), key=lambda p: -p[0])
            ids.append([e for _, e in pairs])
            weights.append([v for v, _ in pairs])
            dropped.append([False] * k)
        if cfg.capacity_factor is not None:
            C = math.ceil(n_real * k / E * cfg.capacity_factor)
            fill = [0] * E
            for slot in range(k):
                for t in range(T):
                    if not valid[t]:
                        continue
                    e = ids[t][slot]
                    dropped[t][slot] = fill[e] >= C
                    fill[e] += 1
    else:
        C = math.ceil(n_real * k / E * (cfg.capacity_factor or 1.0))
        picked = [[] for _ in range(T)]
        for e in range(E):
            order = sorted((t for t in range(T) if valid[t]), key=lambda t: -(rows[t][e] + bias[e]))[:C]
            for t in order:
                picked[t].append(e)
        for t in range(T):
            pairs = sorted(((rows[t][e], e) for e in picked[t]), key=lambda p: -p[0])
            ids.append([e for _, e in pairs] + [-1] * (E - len(pairs)))
            weights.append([w for w, _ in pairs] + [0.0] * (E - len(pairs)))
            dropped.append([False] * E)
    return rows, ids, weights, dropped


CASES = {
    "softmax_top2": MoEConfig.mixtral(8),
    "switch_top1_capacity": MoEConfig.switch(8, capacity_factor=0.75),
    "top2_capacity": MoEConfig(num_experts=6, top_k=2, capacity_factor=1.0),
    "sigmoid_bias": MoEConfig.deepseek(16, 4),
    "expert_choice": MoEConfig.expert_choice(8, 1.25),
    "expert_choice_sigmoid": MoEConfig(num_experts=5, top_k=2, score="sigmoid", routing="expert_choice"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_route_matches_loop_reference(name):
    cfg = CASES[name]
    x_TD, params = make(cfg, bias_scale=0.3 if cfg.score == "sigmoid" else 0.0)
    r = route(x_TD, params, cfg)
    _, ids, weights, dropped = loop_route(x_TD, params, cfg)
    assert r.expert_ids_TK.dtype == torch.int64
    assert r.expert_ids_TK.tolist() == ids
    torch.testing.assert_close(r.weights_TK, torch.tensor(weights, dtype=torch.float32), atol=1e-5, rtol=1e-5)
    assert r.dropped_TK.tolist() == dropped


def test_switch_capacity_overflow_drops_later_tokens_first():
    cfg = MoEConfig.switch(4, capacity_factor=1.0)
    params = RouterParams(router_weight_ED=torch.eye(4, 3), router_bias_E=torch.zeros(4))
    x_TD = torch.zeros(8, 3)
    x_TD[:, 0] = 5.0  # every token prefers expert 0; C = ceil(8/4) = 2
    r = route(x_TD, params, cfg)
    assert r.dropped_TK[:, 0].tolist() == [False, False] + [True] * 6
    assert r.tokens_per_expert_E.tolist() == [8, 0, 0, 0]
    assert r.dropped_per_expert_E.tolist() == [6, 0, 0, 0]
    assert (r.weights_TK[2:] > 0).all()  # dropped slots keep the weight they would have had


def test_slot0_assignments_take_capacity_before_slot1():
    cfg = MoEConfig(num_experts=4, top_k=2, capacity_factor=0.5)  # C = ceil(4*2/4*0.5) = 1
    params = RouterParams(router_weight_ED=torch.eye(4, 4), router_bias_E=torch.zeros(4))
    x_TD = torch.tensor([[0.0, 2.0, 0.0, -9.0],   # slot0 -> 1, slot1 -> 0/2
                         [3.0, 1.0, -9.0, -9.0]])  # slot0 -> 0, slot1 -> 1
    r = route(x_TD, params, cfg)
    # token 1's first choice (expert 0) beats token 0's second choice, even though token 0 comes first
    assert r.expert_ids_TK[1].tolist() == [0, 1] and r.dropped_TK[1].tolist() == [False, True]


@pytest.mark.parametrize("name", sorted(CASES))
def test_counts_equal_one_hot_sums(name):
    cfg = CASES[name]
    x_TD, params = make(cfg, T=33, seed=3)
    r = route(x_TD, params, cfg)
    E = cfg.num_experts
    live_TK = r.expert_ids_TK >= 0
    onehot_TKE = torch.nn.functional.one_hot(r.expert_ids_TK.clamp(min=0), E) * live_TK[..., None]
    assert r.tokens_per_expert_E.tolist() == onehot_TKE.sum((0, 1)).tolist()
    assert r.dropped_per_expert_E.tolist() == (onehot_TKE * r.dropped_TK[..., None]).sum((0, 1)).tolist()
    assert r.top1_per_expert_E.tolist() == onehot_TKE[:, 0].sum(0).tolist()
    torch.testing.assert_close(r.prob_sum_E, r.probs_TE.sum(0))
    assert r.tokens_per_expert_E.dtype == torch.int64 and r.prob_sum_E.dtype == torch.float32


def test_entropy_is_ln_e_and_margin_zero_at_uniform_routing():
    cfg = MoEConfig(num_experts=8, top_k=2)
    params = RouterParams(router_weight_ED=torch.zeros(8, 4), router_bias_E=torch.zeros(8))
    r = route(torch.randn(5, 4), params, cfg)
    torch.testing.assert_close(r.entropy_T, torch.full((5,), math.log(8)))
    torch.testing.assert_close(r.margin_T, torch.zeros(5))
    torch.testing.assert_close(r.logsumexp_T, torch.full((5,), math.log(8)))


def test_topk_weights_are_renormalised_and_switch_uses_raw_probability():
    x_TD, params = make(MoEConfig.mixtral(8))
    r = route(x_TD, params, MoEConfig.mixtral(8))
    torch.testing.assert_close(r.weights_TK.sum(-1), torch.ones(x_TD.shape[0]))
    assert (r.weights_TK[:, 0] >= r.weights_TK[:, 1]).all()
    switch = route(x_TD, params, MoEConfig.switch(8, capacity_factor=None))
    torch.testing.assert_close(switch.weights_TK[:, 0], switch.probs_TE.max(-1).values)


def test_sigmoid_bias_changes_selection_but_not_gate_weights():
    cfg = MoEConfig.deepseek(8, 2)
    x_TD, params = make(cfg)
    params.router_bias_E = torch.zeros(8)
    params.router_bias_E[3] = 100.0  # forces expert 3 into every token's top-2
    r = route(x_TD, params, cfg)
    assert (r.expert_ids_TK == 3).any(-1).all()
    scores_TE = torch.sigmoid(x_TD @ params.router_weight_ED.T)
    chosen_TK = scores_TE.gather(1, r.expert_ids_TK)
    torch.testing.assert_close(r.weights_TK, chosen_TK / chosen_TK.sum(-1, keepdim=True))
    torch.testing.assert_close(r.probs_TE.sum(-1), torch.ones(x_TD.shape[0]))


def test_expert_choice_gives_each_expert_exactly_capacity_tokens():
    cfg = MoEConfig.expert_choice(8, 1.0)
    x_TD, params = make(cfg, T=24)
    r = route(x_TD, params, cfg)
    assert r.expert_ids_TK.shape == (24, 8)
    assert r.tokens_per_expert_E.tolist() == [math.ceil(24 * 2 / 8)] * 8
    assert not r.dropped_TK.any()
    assert (r.weights_TK[r.expert_ids_TK < 0] == 0).all()


@pytest.mark.parametrize("name", ["switch_top1_capacity", "expert_choice", "top2_capacity"])
def test_padding_tokens_do_not_change_real_token_routing(name):
    cfg = CASES[name]
    x_TD, params = make(cfg, T=30, seed=5)
    real = route(x_TD, params, cfg)
    padded_TD = torch.cat([x_TD[:10], torch.randn(7, D) * 10, x_TD[10:]])
    valid_T = torch.ones(37, dtype=torch.bool)
    valid_T[10:17] = False
    r = route(padded_TD, params, cfg, valid_T=valid_T)
    assert r.expert_ids_TK[valid_T].tolist() == real.expert_ids_TK.tolist()
    assert r.dropped_TK[valid_T].tolist() == real.dropped_TK.tolist()
    assert r.tokens_per_expert_E.tolist() == real.tokens_per_expert_E.tolist()
    torch.testing.assert_close(r.aux_loss, real.aux_loss)


def test_aux_loss_is_one_times_coef_at_perfect_balance_and_z_loss_is_mean_square_lse():
    cfg = MoEConfig(num_experts=4, top_k=1, aux_loss_coef=0.5, z_loss_coef=0.1)
    params = RouterParams(router_weight_ED=torch.zeros(4, 4), router_bias_E=torch.zeros(4))
    r = route(torch.randn(8, 4), params, cfg)
    # uniform probs: P_i = 1/4, and f sums to 1, so E * sum f_i P_i = 1 whatever f is
    torch.testing.assert_close(r.aux_loss, torch.tensor(0.5))
    torch.testing.assert_close(r.z_loss, torch.tensor(0.1 * math.log(4) ** 2))


def test_route_compiles_fullgraph_without_host_sync():
    cfg = MoEConfig.switch(8, capacity_factor=1.0)
    x_TD, params = make(cfg, T=16)
    compiled = torch.compile(route, fullgraph=True, backend="eager")
    got, want = compiled(x_TD, params, cfg), route(x_TD, params, cfg)
    assert got.expert_ids_TK.tolist() == want.expert_ids_TK.tolist()
    assert got.dropped_TK.tolist() == want.dropped_TK.tolist()


def test_route_gradient_reaches_router_weight():
    cfg = MoEConfig(num_experts=4, top_k=2, z_loss_coef=1e-3)
    x_TD, params = make(cfg)
    params.router_weight_ED.requires_grad_(True)
    r = route(x_TD, params, cfg)
    (r.weights_TK.sum() + r.aux_loss + r.z_loss).backward()
    assert params.router_weight_ED.grad is not None and params.router_weight_ED.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_experts=8, top_k=9), "top_k=9 exceeds num_experts=8"),
    (dict(score="relu"), "score"),
    (dict(routing="hash"), "routing"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(num_shared_experts=-1), "num_shared_experts"),
])
def test_config_rejects_bad_values_with_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(**kwargs)


def test_route_rejects_mismatched_inputs():
    cfg = MoEConfig()
    x_TD, params = make(cfg)
    with pytest.raises(ValueError, match="hidden size"):
        route(torch.randn(4, D + 1), params, cfg)
    with pytest.raises(ValueError, match="num_experts"):
        route(x_TD, params, MoEConfig(num_experts=4))
    with pytest.raises(ValueError, match="valid_T"):
        route(x_TD, params, cfg, valid_T=torch.ones(3, dtype=torch.bool))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(CASES))
def test_route_makes_no_host_sync_on_cuda(name):
    cfg = CASES[name]
    x_TD, params = make(cfg, T=64)
    gpu = RouterParams(router_weight_ED=params.router_weight_ED.cuda(), router_bias_E=params.router_bias_E.cuda())
    valid_T = torch.ones(64, dtype=torch.bool, device="cuda")
    route(x_TD.cuda(), gpu, cfg, valid_T=valid_T)  # warm-up: lazy CUDA initialisation may sync
    torch.cuda.set_sync_debug_mode("error")
    try:
        r = route(x_TD.cuda(), gpu, cfg, valid_T=valid_T)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert r.expert_ids_TK.cpu().tolist() == route(x_TD, params, cfg).expert_ids_TK.tolist()
