"""experts_forward and moe_layer against a per-token loop; input validation."""
import sys

import pytest
import torch
import torch.nn.functional as F

from moescope.kernels import MoEConfig, MoEParams, experts_forward, moe_layer, route

D, FF = 8, 16


def make(cfg, T=24, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    params = MoEParams.init(cfg, D, FF, generator=g, dtype=dtype)
    return torch.randn(T, D, generator=g).to(dtype), params


def loop_experts(x_TD, routing, params):
    """One token, one slot at a time."""
    y = torch.zeros_like(x_TD, dtype=torch.float64)
    for t in range(x_TD.shape[0]):
        x = x_TD[t].double()
        for slot in range(routing.expert_ids_TK.shape[1]):
            e = int(routing.expert_ids_TK[t, slot])
            if e < 0 or routing.dropped_TK[t, slot]:
                continue
            h = F.silu(x @ params.w_gate_EDF[e].double()) * (x @ params.w_up_EDF[e].double())
            y[t] += float(routing.weights_TK[t, slot]) * (h @ params.w_down_EFD[e].double())
        if params.shared_w_gate_DF is not None:
            h = F.silu(x @ params.shared_w_gate_DF.double()) * (x @ params.shared_w_up_DF.double())
            y[t] += h @ params.shared_w_down_FD.double()
    return y


CONFIGS = {
    "mixtral": MoEConfig.mixtral(4),
    "switch_drops": MoEConfig.switch(4, capacity_factor=0.5),
    "deepseek_shared": MoEConfig.deepseek(8, 3, shared=2),
    "expert_choice": MoEConfig.expert_choice(4, 0.75),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_experts_forward_equals_per_token_loop(name):
    cfg = CONFIGS[name]
    x_TD, params = make(cfg)
    routing = route(x_TD, params, cfg)
    y_TD = experts_forward(x_TD, routing, params, cfg)
    torch.testing.assert_close(y_TD.double(), loop_experts(x_TD, routing, params), atol=1e-5, rtol=1e-5)


def test_fully_dropped_token_gets_only_shared_expert():
    cfg = MoEConfig(num_experts=4, top_k=1, capacity_factor=0.25, normalize_topk=False, num_shared_experts=1)
    x_TD, params = make(cfg, T=16)
    routing = route(x_TD, params, cfg)
    assert routing.dropped_TK.any()
    t = int(routing.dropped_TK[:, 0].nonzero()[0])
    y_TD = experts_forward(x_TD, routing, params, cfg)
    shared = (F.silu(x_TD[t] @ params.shared_w_gate_DF) * (x_TD[t] @ params.shared_w_up_DF)) @ params.shared_w_down_FD
    torch.testing.assert_close(y_TD[t], shared)


def test_moe_layer_torch_backend_is_route_plus_experts():
    cfg = MoEConfig.mixtral(4)
    x_TD, params = make(cfg)
    y_TD, stats = moe_layer(x_TD, params, cfg, backend="torch")
    torch.testing.assert_close(y_TD, experts_forward(x_TD, route(x_TD, params, cfg), params, cfg))
    assert stats.expert_ids_TK.shape == (x_TD.shape[0], 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_moe_layer_half_precision_stays_close_to_float32(dtype):
    cfg = MoEConfig.mixtral(4)
    x_TD, params = make(cfg)
    y32_TD, r32 = moe_layer(x_TD, params, cfg)
    x_h, params_h = make(cfg, dtype=dtype)
    y_TD, r = moe_layer(x_h, params_h, cfg)
    assert y_TD.dtype == dtype and r.logits_TE.dtype == torch.float32
    torch.testing.assert_close(y_TD.float(), y32_TD, atol=0.1, rtol=0.1)


def test_params_init_is_seeded_random_and_shaped():
    cfg = MoEConfig.deepseek(8, 2, shared=2)
    a = MoEParams.init(cfg, D, FF, generator=torch.Generator().manual_seed(1))
    b = MoEParams.init(cfg, D, FF, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.w_up_EDF, b.w_up_EDF)
    assert a.w_gate_EDF.shape == (8, D, FF) and a.w_down_EFD.shape == (8, FF, D)
    assert a.shared_w_gate_DF.shape == (D, 2 * FF) and a.shared_w_down_FD.shape == (2 * FF, D)
    assert a.router_weight_ED.std() > 0 and not a.router_bias_E.any()


def test_triton_backend_missing_raises_runtime_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "moescope.kernels.triton", None)  # makes the import fail
    cfg = MoEConfig.mixtral(4)
    x_TD, params = make(cfg)
    with pytest.raises(RuntimeError, match="triton"):
        moe_layer(x_TD, params, cfg, backend="triton")


@pytest.mark.parametrize("bad_x, message", [
    (torch.randn(2, 3, D), "2-D"),
    (torch.randn(4, D + 2), "hidden size"),
    (torch.randint(0, 5, (4, D)), "dtype"),
    ([[0.0] * D], "x_TD must be a torch.Tensor"),
])
def test_moe_layer_rejects_bad_input(bad_x, message):
    cfg = MoEConfig.mixtral(4)
    _, params = make(cfg)
    with pytest.raises((ValueError, TypeError), match=message):
        moe_layer(bad_x, params, cfg)


def test_moe_layer_rejects_unknown_backend_and_mismatched_config():
    cfg = MoEConfig.mixtral(4)
    x_TD, params = make(cfg)
    with pytest.raises(ValueError, match="backend"):
        moe_layer(x_TD, params, cfg, backend="cuda")
    with pytest.raises(ValueError, match="num_shared_experts"):
        moe_layer(x_TD, params, MoEConfig(num_experts=4, top_k=2, num_shared_experts=1))
    with pytest.raises(TypeError, match="params"):
        moe_layer(x_TD, {"router_weight_ED": params.router_weight_ED}, cfg)
