"""Triton expert path against the torch oracle `experts_forward`: dispatch plan, each
grouped kernel against its per-expert loop, the full forward with ragged / empty experts,
drops, expert choice and shared experts, gradients, and argument checks.

Runs on the Triton CPU interpreter when there is no GPU (tiny sizes; fp32 and fp16 only,
the interpreter computes bf16 wrongly). Legend: T tokens, D hidden, F ffn, E experts,
K slots, M padded rows.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from moescope.kernels.config import MoEConfig  # noqa: E402
from moescope.kernels.experts import experts_forward  # noqa: E402
from moescope.kernels.layer import moe_layer  # noqa: E402
from moescope.kernels.params import MoEParams  # noqa: E402
from moescope.kernels.routing import route  # noqa: E402
from moescope.kernels.triton import experts_triton, route_triton  # noqa: E402
from moescope.kernels.triton.align import build_plan  # noqa: E402
from moescope.kernels.triton.combine import combine, combine_reference  # noqa: E402
from moescope.kernels.triton.grouped_gemm import grouped_gemm, grouped_gemm_reference  # noqa: E402
from moescope.kernels.triton.grouped_swiglu import grouped_swiglu, grouped_swiglu_reference  # noqa: E402
from moescope.kernels.triton.grouped_weight_grad import (  # noqa: E402
    grouped_weight_grad, grouped_weight_grad_reference)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=2e-2, rtol=2e-2)}


@pytest.fixture
def gen():
    """Fresh inputs every run; the seed is printed so a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def ragged_ids(gen, T, K, E, *, empty=()):
    """Distinct experts per token, skipping the `empty` experts, so group sizes are ragged."""
    allowed = torch.tensor([e for e in range(E) if e not in empty])
    perm_TK = torch.stack([torch.randperm(len(allowed), generator=gen)[:K] for _ in range(T)])
    return allowed[perm_TK].to(DEVICE)


def make_params(gen, cfg, D, F, dtype):
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    return MoEParams.init(cfg, D, F, generator=torch.Generator().manual_seed(seed), dtype=dtype, device=DEVICE)


# ---- dispatch plan ----

def test_plan_groups_rows_by_expert_in_slot_major_order_and_pads_to_block():
    ids_TK = torch.tensor([[2, 0], [0, 2], [2, 1]], device=DEVICE)
    dropped_TK = torch.tensor([[False, False], [False, True], [False, False]], device=DEVICE)
    plan = build_plan(ids_TK, dropped_TK, 4, block_m=2)
    # expert 0: (t1,s0), (t0,s1); expert 1: (t2,s1) + pad; expert 2: (t0,s0), (t2,s0); expert 3: empty
    assert plan.group_rows_E.tolist() == [2, 1, 2, 0]
    assert plan.group_start_E.tolist() == [0, 2, 4, 6]
    assert plan.row_token_M.tolist()[:6] == [1, 0, 2, -1, 0, 2]
    assert plan.tile_expert_B.tolist()[:3] == [0, 1, 2] and set(plan.tile_expert_B.tolist()[3:]) == {-1}
    assert plan.row_of_TK.tolist() == [[4, 1], [0, -1], [5, 2]]


# ---- each kernel against its per-expert loop ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block_m", [16, 32])
def test_grouped_swiglu_matches_per_tile_loop_with_ragged_and_empty_experts(gen, dtype, block_m):
    T, K, E, D, F = 37, 2, 6, 40, 72  # D, F not multiples of the blocks
    ids_TK = ragged_ids(gen, T, K, E, empty=(1, 4))
    plan = build_plan(ids_TK, torch.zeros_like(ids_TK, dtype=torch.bool), E, block_m)
    x_TD = torch.randn(T, D, generator=gen).to(DEVICE, dtype)
    w_gate, w_up = (torch.randn(E, D, F, generator=gen).to(DEVICE, dtype) * D ** -0.5 for _ in range(2))
    h_MF = grouped_swiglu(x_TD, w_gate, w_up, plan.row_token_M, plan.tile_expert_B, block_m=block_m)
    want = grouped_swiglu_reference(x_TD, w_gate, w_up, plan.row_token_M, plan.tile_expert_B, block_m=block_m)
    torch.testing.assert_close(h_MF.float(), want, **TOL[dtype])


@pytest.mark.parametrize("transposed", [False, True])
def test_grouped_gemm_matches_per_tile_loop_for_strided_weights(gen, transposed):
    E, K, N, bm = 5, 48, 40, 16
    ids_TK = ragged_ids(gen, 29, 1, E, empty=(2,))
    plan = build_plan(ids_TK, torch.zeros_like(ids_TK, dtype=torch.bool), E, bm)
    a_MK = torch.randn(plan.num_rows, K, generator=gen).to(DEVICE)
    b = torch.randn(E, N, K, generator=gen).to(DEVICE).transpose(1, 2) if transposed \
        else torch.randn(E, K, N, generator=gen).to(DEVICE)
    got = grouped_gemm(a_MK, b, plan.tile_expert_B, block_m=bm)
    torch.testing.assert_close(got, grouped_gemm_reference(a_MK, b, plan.tile_expert_B, block_m=bm), **TOL[torch.float32])


@pytest.mark.parametrize("gather", [False, True])
def test_grouped_weight_grad_sums_each_experts_rows_and_zeroes_empty_experts(gen, gather):
    T, E, I, J, bm = 33, 6, 24, 40, 16
    ids_TK = ragged_ids(gen, T, 2, E, empty=(0, 5))
    plan = build_plan(ids_TK, torch.zeros_like(ids_TK, dtype=torch.bool), E, bm)
    a = torch.randn(T if gather else plan.num_rows, I, generator=gen).to(DEVICE)
    g_MJ = torch.randn(plan.num_rows, J, generator=gen).to(DEVICE)
    rt = plan.row_token_M if gather else None
    got = grouped_weight_grad(a, g_MJ, plan.group_start_E, plan.group_rows_E, row_token_M=rt)
    want = grouped_weight_grad_reference(a, g_MJ, plan.group_start_E, plan.group_rows_E, row_token_M=rt)
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    assert (got[0] == 0).all() and (got[5] == 0).all()


@pytest.mark.parametrize("weighted", [False, True])
def test_combine_gathers_kept_slots_and_skips_dropped(gen, weighted):
    T, K, E = 21, 3, 5
    ids_TK = ragged_ids(gen, T, K, E)
    dropped_TK = (torch.rand(T, K, generator=gen) < 0.3).to(DEVICE)
    plan = build_plan(ids_TK, dropped_TK, E, 16)
    o_MD = torch.randn(plan.num_rows, 72, generator=gen).to(DEVICE)
    w_TK = torch.rand(T, K, generator=gen).to(DEVICE) if weighted else None
    got = combine(o_MD, plan.row_of_TK, w_TK)
    torch.testing.assert_close(got, combine_reference(o_MD, plan.row_of_TK, w_TK), **TOL[torch.float32])


# ---- the whole expert path against experts_forward ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("cfg", [
    MoEConfig(num_experts=8, top_k=1, normalize_topk=False),
    MoEConfig.mixtral(num_experts=8),
    MoEConfig(num_experts=8, top_k=8),
    MoEConfig.switch(num_experts=8, capacity_factor=0.5),
    MoEConfig.deepseek(num_experts=16, top_k=4, shared=1),
    MoEConfig.expert_choice(num_experts=8, capacity_factor=0.75),
], ids=["top1", "mixtral", "k8", "switch_overflow", "deepseek_shared", "expert_choice"])
def test_experts_triton_matches_reference_forward(gen, cfg, dtype):
    T, D, F = 27, 32, 48
    params = make_params(gen, cfg, D, F, dtype)
    x_TD = torch.randn(T, D, generator=gen).to(DEVICE, dtype)
    routing = route(x_TD, params, cfg)
    got = experts_triton(x_TD, routing, params, cfg)
    assert got.dtype == dtype
    torch.testing.assert_close(got, experts_forward(x_TD, routing, params, cfg), **TOL[dtype])


def test_fully_dropped_tokens_and_empty_experts_get_zero_output(gen):
    cfg = MoEConfig.switch(num_experts=4, capacity_factor=0.25)
    params = make_params(gen, cfg, 16, 32, torch.float32)
    x_TD = torch.randn(24, 16, generator=gen).to(DEVICE)
    routing = route(x_TD, params, cfg)
    routing.expert_ids_TK[:] = 3 * (torch.arange(24, device=DEVICE)[:, None] % 2)  # experts 1, 2 empty
    routing.dropped_TK[:] = torch.arange(24, device=DEVICE)[:, None] >= 4
    got = experts_triton(x_TD, routing, params, cfg)
    torch.testing.assert_close(got, experts_forward(x_TD, routing, params, cfg), **TOL[torch.float32])
    assert (got[4:] == 0).all()


def test_moe_layer_triton_backend_matches_torch_backend(gen):
    cfg = MoEConfig.deepseek(num_experts=8, top_k=2, shared=1)
    params = make_params(gen, cfg, 32, 32, torch.float32)
    x_TD = torch.randn(19, 32, generator=gen).to(DEVICE)
    y_tr, r_tr = moe_layer(x_TD, params, cfg, backend="triton")
    y_ref, r_ref = moe_layer(x_TD, params, cfg, backend="torch")
    assert torch.equal(r_tr.expert_ids_TK, r_ref.expert_ids_TK)
    torch.testing.assert_close(y_tr, y_ref, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("cfg", [
    MoEConfig.mixtral(num_experts=4, z_loss_coef=1e-2),
    MoEConfig.switch(num_experts=4, capacity_factor=0.75),
    MoEConfig.deepseek(num_experts=8, top_k=3, shared=1),
    MoEConfig.expert_choice(num_experts=4),
], ids=["mixtral", "switch_overflow", "deepseek_shared", "expert_choice"])
def test_gradients_wrt_input_expert_and_router_weights_match_reference(gen, cfg, dtype):
    T, D, F = 17, 32, 32
    params = make_params(gen, cfg, D, F, dtype)
    names = ["router_weight_ED", "w_gate_EDF", "w_up_EDF", "w_down_EFD"]
    for n in names:
        getattr(params, n).requires_grad_(True)
    x_TD = torch.randn(T, D, generator=gen).to(DEVICE, dtype).requires_grad_(True)
    dy_TD = torch.randn(T, D, generator=gen).to(DEVICE, dtype)

    def grads(router, experts):
        r = router(x_TD, params, cfg)
        loss = (experts(x_TD, r, params, cfg).float() * dy_TD.float()).sum() + r.aux_loss + r.z_loss
        return torch.autograd.grad(loss, [x_TD] + [getattr(params, n) for n in names])

    got = grads(route_triton, experts_triton)
    want = grads(route, experts_forward)
    tol = TOL[dtype] if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    for name, g, w in zip(["x_TD"] + names, got, want):
        torch.testing.assert_close(g.float(), w.float(), **tol, msg=lambda m, n=name: f"{n}: {m}")


# ---- argument checks: one clear line, before any launch ----

def _setup(dtype=torch.float32):
    cfg = MoEConfig(num_experts=4, top_k=2)
    params = MoEParams.init(cfg, 16, 16, generator=torch.Generator().manual_seed(0), dtype=dtype, device=DEVICE)
    x_TD = torch.randn(6, 16, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    return cfg, params, x_TD, route(x_TD, params, cfg)


def test_non_contiguous_input_is_rejected():
    cfg, params, x_TD, routing = _setup()
    x_bad = torch.randn(16, 6, device=DEVICE).t()
    with pytest.raises(ValueError, match="x_TD must be contiguous"):
        experts_triton(x_bad, routing, params, cfg)


def test_dtype_mismatch_between_input_and_expert_weights_is_rejected():
    cfg, params, x_TD, routing = _setup()
    with pytest.raises(TypeError, match="w_gate_EDF has dtype"):
        experts_triton(x_TD.half(), routing, params, cfg)


def test_unsupported_input_dtype_is_rejected():
    cfg, params, x_TD, routing = _setup()
    with pytest.raises(TypeError, match="unsupported dtype"):
        experts_triton(x_TD.double(), routing, params, cfg)


def test_routing_for_other_token_count_is_rejected():
    cfg, params, x_TD, routing = _setup()
    with pytest.raises(ValueError, match="routing covers 6 tokens"):
        experts_triton(torch.cat([x_TD, x_TD]), routing, params, cfg)


def test_kernel_launchers_reject_mismatched_shapes():
    x_TD = torch.zeros(4, 8, device=DEVICE)
    w = torch.zeros(2, 9, 16, device=DEVICE)
    tiles = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    rows = torch.zeros(16, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="hidden size"):
        grouped_swiglu(x_TD, w, w, rows, tiles, block_m=16)
    with pytest.raises(ValueError, match="reduction size"):
        grouped_gemm(torch.zeros(16, 8, device=DEVICE), w, tiles, block_m=16)
    with pytest.raises(ValueError, match="weights_TK shape"):
        combine(torch.zeros(16, 8, device=DEVICE), torch.zeros(4, 2, dtype=torch.int32, device=DEVICE),
                torch.zeros(4, 3, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cfg,D,F", [
    (MoEConfig.mixtral(num_experts=8), 1024, 3584),
    (MoEConfig.deepseek(num_experts=128, top_k=8, shared=1), 1024, 768),
], ids=["mixtral", "fine_grained"])
def test_full_size_bf16_layer_matches_reference_on_gpu(gen, cfg, D, F):
    params = make_params(gen, cfg, D, F, torch.bfloat16)
    x_TD = torch.randn(4096, D, generator=gen).to(DEVICE, torch.bfloat16)
    routing = route(x_TD, params, cfg)
    got = experts_triton(x_TD, routing, params, cfg)
    want = experts_forward(x_TD.float(), routing, MoEParams(**{k: (v.float() if v is not None else None)
                                                                 for k, v in vars(params).items()}), cfg)
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)
