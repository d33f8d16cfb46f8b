"""transformers routers that do not hand the experts' inputs back whole: DBRX, Llama4, JetMoE.

Legend: T tokens, E experts, K slots per token.

- DbrxRouter returns logits only; the block (DbrxFFN) then applies softmax (in the logits'
  dtype), top-k and, when `moe_normalize_expert_weights` is set, divides by the p-norm of
  the top-k values. We apply the same ops to the same logits tensor, so the result is the
  model's decision bit for bit (the jitter of training mode is inside the logits already).
- Llama4Router returns (scores_TE, logits_TE): top-k on the logits, sigmoid of the chosen
  logits, 0 elsewhere. The experts run densely on inputs scaled by scores_TE, so the
  applied gates are the non-zero scores; ids are the router's own top-k of the logits.
- JetMoeTopKGating returns the dispatch in expert-sorted order (index_sorted_experts,
  batch_index, batch_gates, expert_size, logits). Un-sorting batch_gates gives the
  applied gates exactly; expert_size is already a host list, so no sync is added.
  Only the feed-forward MoE router (parent JetMoeMoE) is claimed: JetMoE's attention
  heads (JetMoeMoA) route with the same class in the same block, and two routers on one
  layer number would merge; declare them with a RouterSpec to observe them.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moescope.probe.adapters.base import RouterCapture, RouterSite
from moescope.probe.adapters.hf_common import normalise_rows, number_layers, parent_path, sort_slots


class _ClassAdapter:
    router_class = ""
    kind = ""

    def _accepts(self, model: nn.Module, path: str) -> bool:
        return True

    def _shape(self, module: nn.Module, model: nn.Module, path: str) -> tuple[int, int]:
        """(num_experts, top_k) of one router."""
        raise NotImplementedError

    def sites(self, model: nn.Module) -> list[RouterSite]:
        found = [
            (p, m) for p, m in model.named_modules()
            if type(m).__name__ == self.router_class and type(m).__module__.startswith("transformers.")
            and self._accepts(model, p)
        ]
        layers = number_layers(model, [p for p, _ in found])
        sites = []
        for path, mod in found:
            num_experts, top_k = self._shape(mod, model, path)
            sites.append(RouterSite(module_path=path, layer=layers[path], num_experts=num_experts, top_k=top_k,
                                    router_kind=self.kind))
        return sites


class DbrxAdapter(_ClassAdapter):
    name = "hf-dbrx"
    router_class = "DbrxRouter"
    kind = "softmax-topk-pnorm"

    def __init__(self) -> None:
        self._norm_p: dict[str, float | None] = {}  # router path -> the block's p (rule lives there)

    def _shape(self, module, model, path):
        block = model.get_submodule(parent_path(path))
        self._norm_p[path] = block.moe_normalize_expert_weights
        return int(module.layer.out_features), int(block.top_k)

    def capture(self, site: RouterSite, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> RouterCapture | None:
        logits_TE = output.detach().reshape(-1, site.num_experts)
        # DbrxFFN.route_tokens_to_experts, op for op on the same tensor.
        probs_TE = torch.softmax(logits_TE, dim=1, dtype=logits_TE.dtype)
        weights_TK, ids_TK = torch.topk(probs_TE, site.top_k, dim=-1)
        p = self._norm_p.get(site.module_path)
        if p is not None:
            weights_TK = weights_TK / torch.norm(weights_TK, p=p, dim=-1, keepdim=True)
        ids_TK, weights_TK = sort_slots(ids_TK, weights_TK.float())
        return RouterCapture(probs_TE=probs_TE.float(), expert_ids_TK=ids_TK, weights_TK=weights_TK, logits_TE=logits_TE)


class Llama4Adapter(_ClassAdapter):
    name = "hf-llama4"
    router_class = "Llama4Router"
    kind = "sigmoid-topk-unnormalised"

    def _shape(self, module, model, path):
        return int(module.num_experts), int(module.top_k)

    def capture(self, site: RouterSite, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> RouterCapture | None:
        scores, logits = output
        logits_TE = logits.detach().reshape(-1, site.num_experts)
        scores_TE = scores.detach().reshape(-1, site.num_experts)
        ids_TK = torch.topk(logits_TE, site.top_k, dim=1).indices  # the router's own call
        ids_TK, weights_TK = sort_slots(ids_TK, scores_TE.gather(1, ids_TK).float())
        return RouterCapture(
            probs_TE=normalise_rows(torch.sigmoid(logits_TE.float())), expert_ids_TK=ids_TK, weights_TK=weights_TK,
            logits_TE=logits_TE,
        )


class JetMoeAdapter(_ClassAdapter):
    name = "hf-jetmoe"
    router_class = "JetMoeTopKGating"
    kind = "topk-softmax"

    def _accepts(self, model, path):
        return type(model.get_submodule(parent_path(path))).__name__ == "JetMoeMoE"

    def _shape(self, module, model, path):
        return int(module.num_experts), int(module.top_k)

    def capture(self, site: RouterSite, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> RouterCapture | None:
        index_sorted, _, batch_gates, expert_size, logits = output
        num_experts, top_k = site.num_experts, site.top_k
        logits_TE = logits.detach().reshape(-1, num_experts)
        tokens = logits_TE.shape[0]
        counts_E = torch.as_tensor(expert_size, device=logits_TE.device)
        sorted_ids = torch.repeat_interleave(torch.arange(num_experts, device=logits_TE.device), counts_E)
        ids_flat = torch.empty_like(sorted_ids).scatter_(0, index_sorted, sorted_ids)
        weights_flat = torch.empty_like(batch_gates).scatter_(0, index_sorted, batch_gates.detach())
        ids_TK, weights_TK = sort_slots(ids_flat.reshape(tokens, top_k), weights_flat.reshape(tokens, top_k).float())
        return RouterCapture(probs_TE=torch.softmax(logits_TE.float(), -1), expert_ids_TK=ids_TK,
                             weights_TK=weights_TK, logits_TE=logits_TE)
