"""torchtitan-style token-choice routers, recognised by their interface, not their class.

Legend: T tokens, D hidden, E experts, K slots per token.

The pattern (torchtitan `TokenChoiceTopKRouter`): a module with `gate` = Linear(D, E),
integer `num_experts` and `top_k`, `score_func` in {softmax, sigmoid}, whose forward(x,
expert_bias=None) returns (top_scores_TK, selected_experts_TK, num_tokens_per_expert_E).
top_scores are the gates the MoE applies (after route_norm / route_scale), so they are
copied. The router does not return its logits; we recompute them with one (T, D) x (D, E)
product on the same device, the same operation its gate ran.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moescope.probe.adapters.base import RouterCapture, RouterSite
from moescope.probe.adapters.hf_common import normalise_rows, number_layers, sort_slots


def looks_like_token_choice_router(module: nn.Module) -> bool:
    gate = getattr(module, "gate", None)
    num_experts = getattr(module, "num_experts", None)
    return (
        isinstance(gate, nn.Linear)
        and isinstance(num_experts, int)
        and gate.out_features == num_experts
        and isinstance(getattr(module, "top_k", None), int)
        and getattr(module, "score_func", None) in ("softmax", "sigmoid")
        and not type(module).__module__.startswith("transformers.")
    )


class TorchTitanAdapter:
    name = "torchtitan"

    def sites(self, model: nn.Module) -> list[RouterSite]:
        found = [(p, m) for p, m in model.named_modules() if p and looks_like_token_choice_router(m)]
        layers = number_layers(model, [p for p, _ in found])
        return [
            RouterSite(
                module_path=p, layer=layers[p], num_experts=m.num_experts, top_k=m.top_k,
                router_kind=f"{m.score_func}-topk",
            )
            for p, m in found
        ]

    def capture(self, site: RouterSite, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> RouterCapture | None:
        x = args[0] if args else kwargs["x"]
        top_scores, selected, _ = output
        with torch.no_grad():
            logits_TE = F.linear(x.detach(), module.gate.weight, module.gate.bias).float().reshape(-1, site.num_experts)
        tokens = logits_TE.shape[0]
        if module.score_func == "sigmoid":
            probs_TE = normalise_rows(torch.sigmoid(logits_TE))
        else:
            probs_TE = torch.softmax(logits_TE, dim=-1)
        ids_TK, weights_TK = sort_slots(selected.detach().reshape(tokens, -1), top_scores.detach().reshape(tokens, -1).float())
        return RouterCapture(probs_TE=probs_TE, expert_ids_TK=ids_TK, weights_TK=weights_TK, logits_TE=logits_TE)
