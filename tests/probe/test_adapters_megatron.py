"""Megatron-Core TopKRouter: captured experts and gates equal its (probs, routing_map); drops marked.

megatron-core 0.16.1's gating cannot run on a CPU-only torch without Transformer Engine:
`Router.gating` moves CPU weights to `torch.cuda.current_device()` (AssertionError "Torch
not compiled with CUDA enabled"), and `RouterGatingLinearFunction` reads `te_general_gemm`,
which is never bound when TE is absent (NameError). The module fixture replaces exactly
those two (current device -> "cpu", te_general_gemm -> None, Megatron's own torch.mm
fallback); every routing, top-k and capacity line that runs is Megatron's.
"""
from __future__ import annotations

import socket

import pytest
import torch
from torch import nn

pytest.importorskip("megatron.core.transformer.moe.router")
import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from megatron.core.transformer.moe import moe_utils  # noqa: E402
from megatron.core.transformer.moe.router import TopKRouter  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from moescope.probe import attach  # noqa: E402
from moescope.probe.adapters import discover  # noqa: E402
from moescope.probe.adapters.megatron import MegatronAdapter  # noqa: E402

E, K, D = 8, 2, 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def megatron_cpu():
    """Single-process gloo group + Megatron parallel state, and the two CPU shims."""
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    own_state = not parallel_state.model_parallel_is_initialized()
    if own_state:
        parallel_state.initialize_model_parallel()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "current_device", lambda: "cpu")
        mp.setattr(moe_utils, "te_general_gemm", None, raising=False)
        yield
    moe_utils.clear_aux_losses_tracker()  # the training test logged aux losses into Megatron's global tracker
    if own_state:
        parallel_state.destroy_model_parallel()
    if own_group:
        dist.destroy_process_group()


def make_config(**overrides) -> TransformerConfig:
    base = dict(
        num_layers=2, hidden_size=D, num_attention_heads=4, num_moe_experts=E, moe_router_topk=K,
        use_cpu_initialization=True, moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
    )
    return TransformerConfig(**(base | overrides))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.router = TopKRouter(config, pg_collection=moe_utils.get_default_pg_collection())


class Decoder(nn.Module):
    """Megatron's module layout: decoder.layers.<i>.mlp.router."""

    def __init__(self, config, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList(Block(config) for _ in range(2))
        with torch.no_grad():  # a learned-looking bias so sigmoid selection differs from the gate order
            for block in self.decoder.layers:
                if block.mlp.router.expert_bias is not None:
                    block.mlp.router.expert_bias.copy_(torch.linspace(-0.2, 0.2, E))

    def forward(self, hidden_SBD):
        return [block.mlp.router(hidden_SBD) for block in self.decoder.layers]


def hidden(seq=12, batch=2, seed=5):
    return torch.randn(seq, batch, D, generator=torch.Generator().manual_seed(seed))


def capture_all(model, x):
    pairs = discover(model)
    captures, handles = {}, []
    for adapter, site in pairs:
        def hook(mod, args, kwargs, output, adapter=adapter, site=site):
            captures[site.module_path] = adapter.capture(site, mod, args, kwargs, output)

        handles.append(model.get_submodule(site.module_path).register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            outs = model(x)
    finally:
        for h in handles:
            h.remove()
    return pairs, captures, outs


def assert_capture_equals_router_output(cap, probs_TE, map_TE):
    rebuilt_TE = torch.zeros_like(probs_TE).scatter_add(1, cap.expert_ids_TK, cap.weights_TK)
    torch.testing.assert_close(rebuilt_TE, probs_TE, rtol=0, atol=0)
    kept_TK = ~cap.dropped_TK if cap.dropped_TK is not None else torch.ones_like(cap.expert_ids_TK, dtype=torch.bool)
    kept_TE = torch.zeros_like(map_TE).scatter(1, cap.expert_ids_TK, kept_TK)
    assert torch.equal(kept_TE, map_TE)
    assert bool((cap.weights_TK[:, :-1] >= cap.weights_TK[:, 1:]).all())  # slot 0 = largest gate


def test_megatron_sites_carry_layer_experts_topk_and_kind():
    model = Decoder(make_config(moe_expert_capacity_factor=1.5))
    sites = [site for _, site in discover(model)]
    assert [(s.module_path, s.layer, s.num_experts, s.top_k, s.router_kind, s.capacity_factor) for s in sites] == [
        ("decoder.layers.0.mlp.router", 0, E, K, "softmax-topk-capacity", 1.5),
        ("decoder.layers.1.mlp.router", 1, E, K, "softmax-topk-capacity", 1.5),
    ]
    assert all(isinstance(a, MegatronAdapter) for a, _ in discover(model))


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_megatron_capture_matches_probs_and_routing_map(score):
    extra = dict(moe_router_score_function=score)
    if score == "sigmoid":
        extra |= dict(moe_router_enable_expert_bias=True)
    model = Decoder(make_config(**extra)).eval()
    x = hidden()
    pairs, captures, outs = capture_all(model, x)
    assert [s.router_kind for _, s in pairs] == [f"{score}-topk"] * 2
    for (_, site), (probs_TE, map_TE), block in zip(pairs, outs, model.decoder.layers):
        cap = captures[site.module_path]
        assert cap.dropped_TK is None and cap.expert_ids_TK.shape == (24, K)
        assert_capture_equals_router_output(cap, probs_TE, map_TE)
        with torch.no_grad():
            logits_TE = block.mlp.router.gating(x).reshape(-1, E)  # the router's own gating
        assert torch.equal(cap.logits_TE, logits_TE)
        full_TE = torch.softmax(logits_TE, -1) if score == "softmax" else torch.sigmoid(logits_TE)
        torch.testing.assert_close(cap.probs_TE, full_TE / full_TE.sum(-1, keepdim=True))
    if score == "sigmoid":  # the bias moved some choice away from the top-2 sigmoid scores
        cap = captures[pairs[0][1].module_path]
        plain_TK = torch.topk(cap.probs_TE, K, dim=-1).indices.sort(-1).values
        assert not torch.equal(cap.expert_ids_TK.sort(-1).values, plain_TK)


def test_megatron_capacity_drops_are_marked_on_the_intended_expert():
    model = Decoder(make_config(moe_expert_capacity_factor=0.5, moe_token_drop_policy="probs")).eval()
    x = hidden(seq=16)
    pairs, captures, outs = capture_all(model, x)
    for (_, site), (probs_TE, map_TE) in zip(pairs, outs):
        cap = captures[site.module_path]
        assert_capture_equals_router_output(cap, probs_TE, map_TE)
        assert bool(cap.dropped_TK.any()) and bool((map_TE.sum(-1) < K).any())  # capacity 0.5 drops
        # Every slot, kept or dropped, names one of the token's own top-2 logits (never a filler 0).
        intended_TK = torch.topk(cap.logits_TE, K, dim=-1).indices
        assert torch.equal(cap.expert_ids_TK.sort(-1).values, intended_TK.sort(-1).values)
        assert bool((cap.weights_TK[cap.dropped_TK] == 0).all())
        assert int(cap.dropped_TK.sum()) == 32 * K - int(map_TE.sum())


def test_megatron_outputs_bit_identical_with_and_without_probe_and_counts_match():
    model = Decoder(make_config(moe_expert_capacity_factor=0.5)).eval()
    x = hidden(seq=16)
    with torch.no_grad():
        ref = model(x)
    with attach(model, sink="memory", run="megatron") as probe, torch.no_grad():
        out = model(x)
        tables = probe.tables()
    for (ref_probs, ref_map), (probs, routing_map) in zip(ref, out):
        assert torch.equal(ref_probs, probs) and torch.equal(ref_map, routing_map)
    stats = probe.stats()
    assert stats["failures"] == 0 and stats["router_calls"] == 2
    step = tables["expert_step"].to_pandas().groupby(["layer", "expert"])[["tokens", "dropped"]].sum()
    for layer, (_, routing_map) in enumerate(out):
        kept_E = routing_map.sum(0)
        got = step.loc[layer]
        assert (got["tokens"] - got["dropped"]).reindex(range(E), fill_value=0).tolist() == kept_E.tolist()
        assert int(got["tokens"].sum()) == 32 * K


def test_megatron_training_step_gradients_bit_identical_with_probe():
    """Train mode with aux loss and z-loss attached to probs: the probe changes no gradient."""
    config = make_config(add_bias_linear=False, moe_router_load_balancing_type="aux_loss",
                         moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001, moe_expert_capacity_factor=1.0)
    model = Decoder(config).train()
    x = hidden(seq=16)

    def step():
        model.zero_grad()
        loss = sum((probs_TE * torch.arange(E)).sum() for probs_TE, _ in model(x))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    ref_loss, ref_grads = step()
    with attach(model, sink="memory", run="megatron-train") as probe:
        loss, grads = step()
        rows = probe.tables()["routing"].num_rows
    assert torch.equal(ref_loss, loss) and all(torch.equal(a, b) for a, b in zip(ref_grads, grads))
    assert probe.stats()["failures"] == 0 and rows == 2 * 32 * K
