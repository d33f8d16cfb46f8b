"""The fused Triton router against the torch oracle `route`: selection, gate weights,
statistics, capacity drops, expert choice, gradients and argument checks.

Runs on the Triton CPU interpreter when there is no GPU (tiny sizes). Legend: T tokens,
D hidden, E experts, K top-k.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from moescope.kernels.config import MoEConfig  # noqa: E402
from moescope.kernels.params import MoEParams, RouterParams  # noqa: E402
from moescope.kernels.routing import route  # noqa: E402
from moescope.kernels.triton import route_triton  # noqa: E402
from moescope.kernels.triton.align import queue_positions  # noqa: E402
from moescope.kernels.triton.router import router_topk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STATS = ("probs_TE", "weights_TK", "entropy_T", "logsumexp_T", "margin_T", "prob_sum_E")
COUNTS = ("expert_ids_TK", "dropped_TK", "tokens_per_expert_E", "dropped_per_expert_E", "top1_per_expert_E")


@pytest.fixture
def gen():
    """Fresh inputs every run; the seed is printed so a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def router_inputs(gen, T, D, E, *, dtype=torch.float32, bias_scale=0.0):
    x_TD = torch.randn(T, D, generator=gen).to(DEVICE, dtype)
    params = RouterParams(router_weight_ED=(torch.randn(E, D, generator=gen) * D ** -0.5).to(DEVICE, dtype),
                          router_bias_E=(torch.randn(E, generator=gen) * bias_scale).to(DEVICE))
    return x_TD, params


def assert_routing_matches(got, want, *, atol=1e-5):
    for name in COUNTS:
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    for name in STATS:
        torch.testing.assert_close(getattr(got, name), getattr(want, name), atol=atol, rtol=1e-5, msg=name)
    torch.testing.assert_close(got.aux_loss, want.aux_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.z_loss, want.z_loss, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("E,k", [(1, 1), (4, 1), (8, 2), (8, 8), (16, 3), (64, 6), (256, 8)])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_token_choice_matches_reference_for_k_up_to_8_and_e_up_to_256(gen, E, k, score):
    cfg = MoEConfig(num_experts=E, top_k=k, score=score, z_loss_coef=1e-3)
    x_TD, params = router_inputs(gen, 19, 24, E)
    assert_routing_matches(route_triton(x_TD, params, cfg), route(x_TD, params, cfg))


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_biased_selection_orders_slots_by_unbiased_gate_weight(gen, score):
    # a large bias makes selection disagree with the weights, so the kernel must re-sort
    cfg = MoEConfig(num_experts=16, top_k=4, score=score)
    x_TD, params = router_inputs(gen, 23, 16, 16, bias_scale=0.5)
    got, want = route_triton(x_TD, params, cfg), route(x_TD, params, cfg)
    assert_routing_matches(got, want)
    assert (got.weights_TK[:, :-1] >= got.weights_TK[:, 1:]).all()


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_unnormalised_gates_are_raw_scores(gen, score):
    cfg = MoEConfig(num_experts=8, top_k=3, score=score, normalize_topk=False)
    x_TD, params = router_inputs(gen, 17, 16, 8)
    assert_routing_matches(route_triton(x_TD, params, cfg), route(x_TD, params, cfg))


@pytest.mark.parametrize("capacity_factor", [0.25, 0.5, 1.0, 4.0])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_capacity_overflow_drops_the_same_slot_major_assignments(gen, capacity_factor, k):
    cfg = MoEConfig(num_experts=8, top_k=k, capacity_factor=capacity_factor, normalize_topk=k > 1)
    # a skewed router so some experts overflow and others stay empty
    x_TD, params = router_inputs(gen, 40, 16, 8, bias_scale=0.0)
    params.router_weight_ED[0] += 1.5 * x_TD.mean(0) / x_TD.mean(0).norm()
    got, want = route_triton(x_TD, params, cfg), route(x_TD, params, cfg)
    assert_routing_matches(got, want)
    if capacity_factor < 1:
        assert got.dropped_TK.any()


def test_padding_tokens_are_excluded_from_queues_counts_and_losses(gen):
    cfg = MoEConfig(num_experts=4, top_k=2, capacity_factor=0.75, z_loss_coef=1e-2)
    x_TD, params = router_inputs(gen, 30, 16, 4)
    valid_T = torch.rand(30, generator=gen).to(DEVICE) > 0.3
    assert_routing_matches(route_triton(x_TD, params, cfg, valid_T=valid_T), route(x_TD, params, cfg, valid_T=valid_T))


@pytest.mark.parametrize("capacity_factor", [None, 0.5, 2.0])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_expert_choice_matches_reference(gen, capacity_factor, score):
    cfg = MoEConfig.expert_choice(num_experts=8, capacity_factor=capacity_factor, top_k=2, score=score)
    x_TD, params = router_inputs(gen, 20, 16, 8)
    got = route_triton(x_TD, params, cfg)
    assert got.expert_ids_TK.shape == (20, 8)
    assert_routing_matches(got, route(x_TD, params, cfg))


def test_half_precision_input_routes_in_float32_like_the_reference(gen):
    cfg = MoEConfig(num_experts=16, top_k=2)
    x_TD, params = router_inputs(gen, 32, 32, 16, dtype=torch.float16)
    got, want = route_triton(x_TD, params, cfg), route(x_TD, params, cfg)
    assert got.logits_TE.dtype == torch.float32
    assert_routing_matches(got, want)


def test_zero_tokens_give_empty_routing_and_zero_counts():
    cfg = MoEConfig(num_experts=4, top_k=2)
    x_TD, params = router_inputs(torch.Generator().manual_seed(0), 0, 8, 4)
    got = route_triton(x_TD, params, cfg)
    assert got.expert_ids_TK.shape == (0, 2)
    assert got.tokens_per_expert_E.tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("cfg", [
    MoEConfig(num_experts=8, top_k=2, z_loss_coef=1e-2, aux_loss_coef=0.1),
    MoEConfig(num_experts=8, top_k=3, score="sigmoid", aux_loss_coef=0.1),
    MoEConfig.switch(num_experts=4, capacity_factor=1.0),
    MoEConfig.expert_choice(num_experts=4, aux_loss_coef=0.1, z_loss_coef=1e-2),
], ids=["softmax", "sigmoid", "switch", "expert_choice"])
def test_router_weight_gradient_through_gates_and_losses_matches_reference(gen, cfg):
    x_TD, params = router_inputs(gen, 13, 16, cfg.num_experts)
    params.router_weight_ED.requires_grad_(True)
    x_TD.requires_grad_(True)
    probe_TK = torch.randn(13, cfg.top_k if cfg.routing == "token_choice" else cfg.num_experts, generator=gen)
    probe_TE = torch.randn(13, cfg.num_experts, generator=gen)

    def grads(fn):
        r = fn(x_TD, params, cfg)
        loss = ((r.weights_TK * probe_TK.to(DEVICE)).sum() + (r.probs_TE * probe_TE.to(DEVICE)).sum()
                + r.aux_loss + r.z_loss)
        return torch.autograd.grad(loss, [params.router_weight_ED, x_TD])

    for got, want in zip(grads(route_triton), grads(route)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_queue_positions_are_slot_major_then_token_order():
    ids_TK = torch.tensor([[0, 1], [1, 0], [0, -1], [1, 0]])
    # slot 0: t0->e0 (0), t1->e1 (0), t2->e0 (1), t3->e1 (1); slot 1: t0->e1 (2), t1->e0 (2), t3->e0 (3)
    assert queue_positions(ids_TK, 2).tolist() == [[0, 2], [0, 2], [1, -1], [1, 3]]


# ---- argument checks: one clear line, before any launch ----

def test_top_k_larger_than_expert_count_is_rejected():
    with pytest.raises(ValueError, match="top_k=5 exceeds"):
        router_topk(torch.zeros(3, 4, device=DEVICE), torch.zeros(4, device=DEVICE), top_k=5)


def test_non_contiguous_logits_are_rejected():
    logits = torch.zeros(4, 3, device=DEVICE).t()
    with pytest.raises(ValueError, match="logits_TE must be contiguous"):
        router_topk(logits, torch.zeros(4, device=DEVICE), top_k=1)


def test_non_float32_logits_are_rejected():
    with pytest.raises(TypeError, match="logits_TE has unsupported dtype"):
        router_topk(torch.zeros(3, 4, device=DEVICE, dtype=torch.float16), torch.zeros(4, device=DEVICE), top_k=1)


def test_bias_of_wrong_length_is_rejected():
    with pytest.raises(ValueError, match="bias_E must have shape"):
        router_topk(torch.zeros(3, 4, device=DEVICE), torch.zeros(5, device=DEVICE), top_k=1)


def test_mismatched_hidden_size_is_rejected_by_route_triton():
    params = MoEParams.init(MoEConfig(num_experts=4), 8, 16)
    with pytest.raises(ValueError, match="hidden size"):
        route_triton(torch.zeros(3, 9, device=DEVICE), params, MoEConfig(num_experts=4))


def test_integer_input_is_rejected_by_route_triton():
    params = MoEParams.init(MoEConfig(num_experts=4), 8, 16)
    with pytest.raises(ValueError, match="x_TD dtype"):
        route_triton(torch.zeros(3, 8, dtype=torch.int32, device=DEVICE), params, MoEConfig(num_experts=4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("E,k", [(8, 2), (128, 8), (256, 8)])
def test_full_size_router_matches_reference_on_gpu(gen, E, k):
    cfg = MoEConfig(num_experts=E, top_k=k, score="sigmoid" if E > 8 else "softmax", capacity_factor=1.25)
    x_TD, params = router_inputs(gen, 16384, 1024, E, dtype=torch.bfloat16)
    got, want = route_triton(x_TD, params, cfg), route(x_TD, params, cfg)
    # near-ties can flip selection between implementations; demand near-total agreement
    agree = (got.expert_ids_TK == want.expert_ids_TK).all(-1).float().mean().item()
    assert agree > 0.999
    torch.testing.assert_close(got.entropy_T, want.entropy_T, atol=1e-4, rtol=1e-4)
