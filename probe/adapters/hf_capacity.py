"""transformers routers with expert capacity: SwitchTransformers (top-1) and NLLB-MoE (top-2).

Legend: T tokens, E experts, K slots per token.

Both return a capacity-masked one-hot dispatch mask instead of indices, so a dropped
token's row is all zero and a naive argmax would report it as expert 0. We take the
chosen expert from the router's own rule (argmax of its probabilities, computed in the
router's dtype as the model does) and mark the slot dropped where the mask is empty.
Dropped slots carry weight 0: nothing was applied for them.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moescope.probe.adapters.base import RouterCapture, RouterSite
from moescope.probe.adapters.hf_common import number_layers, sort_slots


def _model_probs(module: nn.Module, logits_TE: torch.Tensor) -> torch.Tensor:
    """The router's softmax exactly as the family computes it (router dtype, then input dtype)."""
    router_dtype = getattr(module, "dtype", torch.float32)
    input_dtype = getattr(module, "input_dtype", logits_TE.dtype)
    return torch.softmax(logits_TE, dim=-1, dtype=router_dtype).to(input_dtype)


class _CapacityAdapter:
    router_class = ""
    top_k = 1
    kind = ""

    def sites(self, model: nn.Module) -> list[RouterSite]:
        found = [
            (p, m) for p, m in model.named_modules()
            if type(m).__name__ == self.router_class and type(m).__module__.startswith("transformers.")
        ]
        layers = number_layers(model, [p for p, _ in found])
        return [
            RouterSite(
                module_path=p, layer=layers[p], num_experts=int(m.num_experts), top_k=self.top_k,
                router_kind=self.kind,
            )
            for p, m in found
        ]


class SwitchAdapter(_CapacityAdapter):
    """SwitchTransformersTop1Router: (dispatch_BSE one-hot, top1 prob_BS1, logits_BSE).

    Capacity here is an absolute token count (config.expert_capacity), not a factor, so
    the site's capacity_factor stays None; drops are recorded per slot instead.
    """

    name = "hf-switch"
    router_class = "SwitchTransformersTop1Router"
    top_k = 1
    kind = "switch-top1-capacity"

    def capture(self, site: RouterSite, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> RouterCapture | None:
        dispatch, top_prob, logits = output
        num_experts = site.num_experts
        logits_TE = logits.detach().reshape(-1, num_experts)
        dispatch_TE = dispatch.detach().reshape(-1, num_experts)
        kept_T = dispatch_TE.sum(-1) > 0
        chosen_T = _model_probs(module, logits_TE).argmax(-1)
        ids_T1 = torch.where(kept_T, dispatch_TE.argmax(-1), chosen_T).unsqueeze(1)
        weights_T1 = top_prob.detach().reshape(-1, 1).float() * kept_T.unsqueeze(1)
        return RouterCapture(
            probs_TE=torch.softmax(logits_TE.float(), dim=-1),
            expert_ids_TK=ids_T1,
            weights_TK=weights_T1,
            logits_TE=logits_TE,
            dropped_TK=~kept_T.unsqueeze(1),
        )


class NllbMoeAdapter(_CapacityAdapter):
    """NllbMoeTop2Router: (top1 dispatch_TE one-hot, combine weights_TE, logits_TE).

    The combine matrix holds each token's applied gate per expert (0 where dropped), so the
    weights are read from it. The second expert is the argmax of the logits without the
    first, exactly the router's rule. Capacity depends on train/eval mode (an absolute
    count, or moe_eval_capacity_token_fraction of the tokens), so capacity_factor is None.
    """

    name = "hf-nllb-moe"
    router_class = "NllbMoeTop2Router"
    top_k = 2
    kind = "top2-capacity"

    def capture(self, site: RouterSite, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> RouterCapture | None:
        top1_mask, combine, logits = output
        num_experts = site.num_experts
        logits_TE = logits.detach().reshape(-1, num_experts)
        top1_TE = top1_mask.detach().reshape(-1, num_experts)
        combine_TE = combine.detach().reshape(-1, num_experts).float()
        kept1_T = top1_TE.sum(-1) > 0
        first_T = torch.where(kept1_T, top1_TE.argmax(-1), _model_probs(module, logits_TE).argmax(-1))
        rest_TE = logits_TE.scatter(1, first_T.unsqueeze(1), float("-inf"))
        second_T = rest_TE.argmax(-1)
        ids_T2 = torch.stack([first_T, second_T], dim=1)
        weights_T2 = combine_TE.gather(1, ids_T2)
        dropped_T2 = torch.stack([~kept1_T, weights_T2[:, 1] == 0], dim=1)
        weights_T2 = weights_T2 * ~dropped_T2
        ids_T2, weights_T2, dropped_T2 = sort_slots(ids_T2, weights_T2, dropped_T2)
        return RouterCapture(
            probs_TE=torch.softmax(logits_TE.float(), dim=-1),
            expert_ids_TK=ids_T2,
            weights_TK=weights_T2,
            logits_TE=logits_TE,
            dropped_TK=dropped_T2,
        )
