"""DeepSpeed MoE: `deepspeed.moe.sharded_moe.TopKGate` (top-1, top-2, top-k with capacity).

Legend: T tokens, D hidden, E experts, K slots per token, C expert capacity.

The gate returns (l_aux, combine_weights_TEC, dispatch_mask_TEC, exp_counts). Summing
over C gives each token's applied gate per expert (0 where capacity dropped it), and the
dispatch mask says which (token, expert) pairs were computed. The chosen experts are the
dispatched ones, then the remaining ones by logit rank: that recovers the slots capacity
dropped (DeepSpeed's own argmax order; for top-2 with 2nd-expert sampling in training a
dropped second slot is the best-logit candidate, not the sampled one). Logits are not
returned, so they are recomputed with the gate's own linear in fp32, as the gate does.

`MOELayer` calls the gate with sparse_routes=True, which returns (l_aux, capacity,
num_experts, indices_KT, locations_KT, gates_KT, exp_counts): per slot the expert
(-1 where capacity dropped the route), its buffer slot and its applied gate (0 when
dropped). Kept routes and all gates are read as they are; a dropped slot's expert
is recovered as the best-logit expert the token was not dispatched to, in slot
order: exact for top-1 (without RSample noise) and top-k (slots are the gate's
top-k, best first), and for top-2's first slot; a dropped sampled second slot is
the best-logit candidate, as above.
"""
from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moescope.probe.adapters.base import RouterCapture, RouterSite
from moescope.probe.adapters.hf_common import number_layers, sort_slots
from moescope.probe.adapters.parallel import ancestors, contiguous_devices, group_size


def _gate_class():
    mod = sys.modules.get("deepspeed.moe.sharded_moe")  # never import deepspeed ourselves
    return getattr(mod, "TopKGate", None) if mod is not None else None


class DeepSpeedAdapter:
    name = "deepspeed"

    def sites(self, model: nn.Module) -> list[RouterSite]:
        gate_cls = _gate_class()
        if gate_cls is None:
            return []
        found = [(p, m) for p, m in model.named_modules() if isinstance(m, gate_cls)]
        layers = number_layers(model, [p for p, _ in found])
        return [
            RouterSite(
                module_path=p, layer=layers[p], num_experts=int(m.wg.out_features), top_k=int(m.k),
                router_kind=f"top{m.k}-capacity" if m.drop_tokens else f"top{m.k}",
                capacity_factor=float(m.capacity_factor),
            )
            for p, m in found
        ]

    def expert_devices(self, model: nn.Module, site: RouterSite) -> list[int] | None:
        """EP rank of each expert, from the gate's MOELayer: its expert-parallel group once set, else its ep_size.

        DeepSpeed's all-to-all hands rank r the experts r·E/G .. (r+1)·E/G − 1 (`num_local_experts` each).
        """
        for layer in ancestors(model, site.module_path):
            if hasattr(layer, "num_local_experts") and hasattr(layer, "ep_size") and getattr(layer, "gate", None) is not None:
                group = getattr(layer, "ep_group", None)
                return contiguous_devices(site.num_experts, group_size(group) if group is not None else layer.ep_size)
        return None

    def capture(self, site: RouterSite, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> RouterCapture | None:
        if not isinstance(output, tuple):
            return None
        x = args[0] if args else kwargs["input"]
        num_experts, top_k = site.num_experts, site.top_k
        with torch.no_grad():
            logits_TE = F.linear(x.detach().float(), module.wg.weight.float()).reshape(-1, num_experts)
        if len(output) == 7 and output[3].dim() == 2:
            return _sparse_capture(logits_TE, output[3], output[5])
        if len(output) != 4 or output[1].dim() != 3:
            return None
        _, combine_TEC, dispatch_TEC, _ = output
        combine_TE = combine_TEC.detach().float().sum(-1)
        dispatched_TE = dispatch_TEC.detach().any(-1)
        # Dispatched experts first (large offset), then the rest by logit.
        rank_TE = logits_TE - logits_TE.amin(-1, keepdim=True) + dispatched_TE * (logits_TE.abs().amax() * 4 + 1)
        ids_TK = torch.topk(rank_TE, top_k, dim=-1).indices
        weights_TK = combine_TE.gather(1, ids_TK)
        dropped_TK = ~dispatched_TE.gather(1, ids_TK)
        ids_TK, weights_TK, dropped_TK = sort_slots(ids_TK, weights_TK, dropped_TK)
        return RouterCapture(
            probs_TE=torch.softmax(logits_TE, dim=-1), expert_ids_TK=ids_TK, weights_TK=weights_TK,
            logits_TE=logits_TE, dropped_TK=dropped_TK,
        )


def _sparse_capture(logits_TE: torch.Tensor, indices_KT: torch.Tensor, gates_KT: torch.Tensor) -> RouterCapture:
    """Read the sparse_routes layout (see the module docstring): kept routes as given, dropped ones recovered."""
    kept_ids_TK = indices_KT.detach().t().long()
    dropped_TK = kept_ids_TK < 0
    weights_TK = gates_KT.detach().t().float()
    # Dropped slots mark a scratch column, so they cannot unmark a kept expert sharing their index.
    tokens, num_experts = logits_TE.shape
    kept_TE = torch.zeros(tokens, num_experts + 1, dtype=torch.bool, device=logits_TE.device).scatter(
        1, kept_ids_TK.masked_fill(dropped_TK, num_experts), True)[:, :num_experts]
    # Undispatched experts best first; the n-th dropped slot of a token takes the n-th of them.
    spare_TK = logits_TE.masked_fill(kept_TE, float("-inf")).topk(kept_ids_TK.shape[1], dim=-1).indices
    nth_TK = (dropped_TK.cumsum(-1) - 1).clamp_min(0)
    ids_TK = torch.where(dropped_TK, spare_TK.gather(1, nth_TK), kept_ids_TK)
    ids_TK, weights_TK, dropped_TK = sort_slots(ids_TK, weights_TK, dropped_TK)
    return RouterCapture(
        probs_TE=torch.softmax(logits_TE, dim=-1), expert_ids_TK=ids_TK, weights_TK=weights_TK,
        logits_TE=logits_TE, dropped_TK=dropped_TK,
    )
