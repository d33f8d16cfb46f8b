"""Megatron-Core: `megatron.core.transformer.moe.router.TopKRouter`.

Legend: T tokens (seq * batch of the call), D hidden, E experts, K slots per token.

The router's forward(input_SBD) returns (probs_TE, routing_map_TE): probs holds the gate
weight the MoE layer applies, scattered over E (0 elsewhere), and routing_map says which
(token, expert) pairs are dispatched. Those two tensors are the truth and are copied:
the slots are the dispatched experts, ordered by applied weight.

Logits are not returned. They are recomputed from the hooked input with the router's own
weight/bias in `moe_router_dtype`, the same product as Megatron's non-Transformer-Engine
gating path (with TE's gemm the low bits may differ; that touches only probs_TE/logits_TE
and the order of dropped slots, never the copied ids/weights). Input jitter and
`moe_router_force_load_balancing` randomise the router's logits, so there the recomputed
distribution is the un-jittered one.

Capacity (moe_expert_capacity_factor): a dropped slot has routing_map False, so the
intended expert is recovered by re-running Megatron's own `topk_routing_with_score_function`
on the recomputed logits with the router's settings (score function, groups, expert bias,
scaling): its pre-drop map names the experts each token chose. Those not dispatched are
the dropped slots (weight 0, dropped True, placed after the kept slots). With
moe_pad_expert_input_to_capacity Megatron also dispatches padding pairs with probs 0;
those were never chosen, so only pairs with a non-zero gate count as dispatched there.
"""
from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from moescope.probe.adapters.base import RouterCapture, RouterSite
from moescope.probe.adapters.hf_common import normalise_rows, number_layers, sort_slots
from moescope.probe.adapters.parallel import ancestors, contiguous_devices, group_size

_ROUTER_MODULE = "megatron.core.transformer.moe.router"
_UTILS_MODULE = "megatron.core.transformer.moe.moe_utils"
_ROUTER_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


def _router_class():
    mod = sys.modules.get(_ROUTER_MODULE)  # never import megatron ourselves: it is slow and noisy
    return getattr(mod, "TopKRouter", None) if mod is not None else None


def _kind(cfg: Any) -> str:
    score = "sinkhorn" if cfg.moe_router_load_balancing_type == "sinkhorn" else cfg.moe_router_score_function
    group = "-group" if cfg.moe_router_group_topk else ""
    capacity = "-capacity" if cfg.moe_expert_capacity_factor is not None else ""
    return f"{score}{group}-topk{capacity}"


def router_logits(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(T, E) logits as `Router.gating` computes them without Transformer Engine."""
    dtype = _ROUTER_DTYPES.get(module.config.moe_router_dtype, x.dtype)
    x_TD = x.detach().reshape(-1, x.shape[-1]).to(dtype)
    weight_ED = module.weight.detach().to(device=x_TD.device, dtype=dtype)
    if module.bias is None:
        return torch.mm(x_TD, weight_ED.t())
    return torch.addmm(module.bias.detach().to(device=x_TD.device, dtype=dtype), x_TD, weight_ED.t())


def _intended(module: nn.Module, logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-drop (probs_TE, map_TE) from Megatron's own top-k function; unfused, no replay."""
    cfg = module.config
    if cfg.moe_router_load_balancing_type == "sinkhorn":
        # Sinkhorn's training-time choice needs its balancing pass; the eval ranking stands in.
        scores_TE = torch.softmax(logits_TE.float(), dim=-1) if module.topk > 1 else torch.sigmoid(logits_TE.float())
        ids_TK = torch.topk(scores_TE, module.topk, dim=-1).indices
        map_TE = torch.zeros_like(scores_TE, dtype=torch.bool).scatter(1, ids_TK, True)
        return scores_TE * map_TE, map_TE
    topk_fn = sys.modules[_UTILS_MODULE].topk_routing_with_score_function
    return topk_fn(
        logits_TE, module.topk, use_pre_softmax=cfg.moe_router_pre_softmax, num_groups=cfg.moe_router_num_groups,
        group_topk=cfg.moe_router_group_topk, scaling_factor=cfg.moe_router_topk_scaling_factor,
        score_function=module.score_function, expert_bias=module.expert_bias, fused=False, router_replay=None,
    )


class MegatronAdapter:
    name = "megatron"

    def sites(self, model: nn.Module) -> list[RouterSite]:
        router_cls = _router_class()
        if router_cls is None:
            return []
        found = [(p, m) for p, m in model.named_modules() if isinstance(m, router_cls)]
        layers = number_layers(model, [p for p, _ in found])
        sites = []
        for path, module in found:
            cfg = module.config
            capacity = cfg.moe_expert_capacity_factor
            sites.append(RouterSite(
                module_path=path, layer=layers[path], num_experts=int(cfg.num_moe_experts),
                top_k=int(cfg.moe_router_topk), router_kind=_kind(cfg),
                capacity_factor=float(capacity) if capacity is not None else None,
            ))
        return sites

    def expert_devices(self, model: nn.Module, site: RouterSite) -> list[int] | None:
        """EP rank of each expert: the MoE layer's group (`ep_group`), else the router config's EP size.

        Megatron's MoELayer holds experts ep_rank·E/G .. (ep_rank+1)·E/G − 1 (`local_expert_indices`).
        """
        size = None
        for layer in ancestors(model, site.module_path):
            if hasattr(layer, "local_expert_indices") and hasattr(layer, "ep_group"):
                size = group_size(layer.ep_group)
                break
        if size is None:
            size = getattr(model.get_submodule(site.module_path).config, "expert_model_parallel_size", None)
        return contiguous_devices(site.num_experts, size)

    def capture(self, site: RouterSite, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> RouterCapture | None:
        if not isinstance(output, tuple) or len(output) != 2:
            return None
        x = args[0] if args else kwargs["input"]
        probs_TE, map_TE = output[0].detach(), output[1].detach()
        num_experts, top_k = site.num_experts, site.top_k
        cfg = module.config
        with torch.no_grad():
            logits_TE = router_logits(module, x)
            dispatched_TE = map_TE & (probs_TE != 0) if cfg.moe_pad_expert_input_to_capacity else map_TE
            if cfg.moe_expert_capacity_factor is not None:
                intended_probs_TE, intended_TE = _intended(module, logits_TE)
            else:
                intended_probs_TE, intended_TE = probs_TE, dispatched_TE
            # Rank: dispatched first, then intended-but-dropped, each by intended gate; no host sync.
            gate_TE = intended_probs_TE.float().abs()
            gate_TE = gate_TE / (gate_TE.amax(-1, keepdim=True) * 2 + 1e-30)  # in [0, 0.5]
            rank_TE = dispatched_TE.float() * 4 + intended_TE.float() * 2 + gate_TE
            ids_TK = torch.topk(rank_TE, top_k, dim=-1).indices
            weights_TK = probs_TE.float().gather(1, ids_TK)
            dropped_TK = ~dispatched_TE.gather(1, ids_TK)
            ids_TK, weights_TK, dropped_TK = sort_slots(ids_TK, weights_TK, dropped_TK)
            logits32_TE = logits_TE.float().reshape(-1, num_experts)
            if module.score_function == "sigmoid" and cfg.moe_router_load_balancing_type != "sinkhorn":
                full_TE = normalise_rows(torch.sigmoid(logits32_TE))
            else:
                full_TE = torch.softmax(logits32_TE, dim=-1)
        return RouterCapture(
            probs_TE=full_TE, expert_ids_TK=ids_TK, weights_TK=weights_TK, logits_TE=logits32_TE,
            dropped_TK=dropped_TK if cfg.moe_expert_capacity_factor is not None else None,
        )
