"""Adapter for the bundled reference MoE (`moescope.kernels.model`).

Legend: T tokens, E experts, K slots per token.

The reference Router already returns the exact decision (`Routing`), including drops
and empty expert-choice slots, so capture is a field-by-field copy.
"""
from __future__ import annotations

import sys
from typing import Any

from torch import nn

from moescope.probe.adapters.base import RouterCapture, RouterSite
from moescope.probe.adapters.hf_common import number_layers

_MODULE = "moescope.kernels.model"


def _router_class():
    # Lazy: a model built from the reference has already imported it; never import kernels here.
    mod = sys.modules.get(_MODULE)
    return getattr(mod, "Router", None) if mod is not None else None


def _kind(cfg: Any) -> str:
    score = getattr(cfg, "score", "softmax")
    routing = getattr(cfg, "routing", "topk")
    kind = f"{score}-{routing}"
    if getattr(cfg, "capacity_factor", None):
        kind += "-capacity"
    return kind


class ReferenceAdapter:
    name = "reference"

    def sites(self, model: nn.Module) -> list[RouterSite]:
        router_cls = _router_class()
        if router_cls is None:
            return []
        found = [(p, m) for p, m in model.named_modules() if type(m) is router_cls or isinstance(m, router_cls)]
        layers = number_layers(model, [p for p, _ in found])
        sites = []
        for path, mod in found:
            cfg = getattr(mod, "cfg", None)
            sites.append(RouterSite(
                module_path=path,
                layer=layers[path],
                num_experts=int(mod.num_experts),
                top_k=int(mod.top_k),
                router_kind=_kind(cfg),
                capacity_factor=getattr(cfg, "capacity_factor", None),
            ))
        return sites

    def capture(self, site: RouterSite, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> RouterCapture | None:
        r = output
        probs_TE = r.probs_TE.reshape(-1, site.num_experts)
        tokens = probs_TE.shape[0]
        dropped_TK = getattr(r, "dropped_TK", None)
        weights_TK = r.weights_TK.reshape(tokens, -1)
        if dropped_TK is not None:
            # Routing keeps the weight a dropped slot would have had; the record holds the weight applied (0).
            weights_TK = weights_TK.masked_fill(dropped_TK.reshape(tokens, -1), 0.0)
        return RouterCapture(
            probs_TE=probs_TE,
            expert_ids_TK=r.expert_ids_TK.reshape(tokens, -1),
            weights_TK=weights_TK,
            logits_TE=None if r.logits_TE is None else r.logits_TE.reshape(tokens, site.num_experts),
            dropped_TK=None if dropped_TK is None else dropped_TK.reshape(tokens, -1),
        )
