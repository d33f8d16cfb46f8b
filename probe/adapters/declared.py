"""Routers the user declares: name the module and the routing rule, we do the rest.

Legend: T tokens, E experts, K slots per token.

    RouterSpec(module="model.layers.*.mlp.gate", num_experts=8, top_k=2, rule="softmax-topk")

The spec is checked against the model at discover time (a module must match and its
weight must have E output rows), so a wrong spec fails before training starts rather
than at step 10,000.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moescope.probe.adapters.base import RouterCapture, RouterSite
from moescope.probe.adapters.hf_common import normalise_rows, number_layers

RULES = ("softmax-topk", "topk-softmax", "sigmoid-topk")
OUTPUTS = ("logits", "tuple-logits-first", "tuple-logits-last")


@dataclass(frozen=True)
class RouterSpec:
    """A user-declared router.

    module: glob over module paths (`model.layers.*.mlp.gate`) or, prefixed `re:`, a regex
      matched against the whole path.
    rule: softmax-topk (softmax over E, keep top-k), topk-softmax (top-k logits, softmax
      over those k), sigmoid-topk (sigmoid scores, keep top-k).
    normalize: renormalise the kept k weights to sum to 1 (softmax-topk, sigmoid-topk).
    output: where the module's forward output holds the (..., E) logits.
    scale: multiplier applied to the kept weights (DeepSeek's routed_scaling_factor).
    """

    module: str
    num_experts: int
    top_k: int
    rule: str = "softmax-topk"
    normalize: bool = True
    output: str = "logits"
    scale: float = 1.0
    capacity_factor: float | None = None

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"RouterSpec.rule {self.rule!r} is not one of {', '.join(RULES)}")
        if self.output not in OUTPUTS:
            raise ValueError(f"RouterSpec.output {self.output!r} is not one of {', '.join(OUTPUTS)}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"RouterSpec.top_k={self.top_k} must be in 1..num_experts={self.num_experts}")

    def matches(self, path: str) -> bool:
        if self.module.startswith("re:"):
            return re.fullmatch(self.module[3:], path) is not None
        return fnmatch.fnmatchcase(path, self.module)


def _router_rows(module: nn.Module) -> int | None:
    """Output rows of the router's projection: its own 2-D weight, else its first Linear."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            return int(sub.out_features)
    return None


class DeclaredAdapter:
    name = "declared"

    def __init__(self, spec: RouterSpec) -> None:
        self.spec = spec

    def sites(self, model: nn.Module) -> list[RouterSite]:
        spec = self.spec
        found = [(p, m) for p, m in model.named_modules() if p and spec.matches(p)]
        if not found:
            raise ValueError(f"RouterSpec(module={spec.module!r}) matches no module of {type(model).__name__}")
        for path, mod in found:
            rows = _router_rows(mod)
            if rows is None:
                raise ValueError(f"RouterSpec: {path} ({type(mod).__name__}) has no 2-D weight or Linear to check num_experts against")
            if rows != spec.num_experts:
                raise ValueError(f"RouterSpec: {path} projects to {rows} outputs, not num_experts={spec.num_experts}")
        layers = number_layers(model, [p for p, _ in found])
        return [
            RouterSite(
                module_path=path, layer=layers[path], num_experts=spec.num_experts, top_k=spec.top_k,
                router_kind=f"declared-{spec.rule}", capacity_factor=spec.capacity_factor,
            )
            for path, _ in found
        ]

    def capture(self, site: RouterSite, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> RouterCapture | None:
        spec = self.spec
        if spec.output == "logits":
            logits = output
        elif spec.output == "tuple-logits-first":
            logits = output[0]
        else:
            logits = output[-1]
        if not isinstance(logits, torch.Tensor) or logits.shape[-1] != spec.num_experts:
            return None  # shape-level refusal: the declared output is not (..., E) logits
        return route(logits.detach().reshape(-1, spec.num_experts), spec.rule, spec.top_k, spec.normalize, spec.scale)


def route(logits_TE: torch.Tensor, rule: str, top_k: int, normalize: bool = True, scale: float = 1.0) -> RouterCapture:
    """Apply one of the declared rules to raw logits."""
    logits_TE = logits_TE.float()
    if rule == "softmax-topk":
        probs_TE = torch.softmax(logits_TE, dim=-1)
        weights_TK, ids_TK = torch.topk(probs_TE, top_k, dim=-1)
        if normalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    elif rule == "topk-softmax":
        probs_TE = torch.softmax(logits_TE, dim=-1)
        top_TK, ids_TK = torch.topk(logits_TE, top_k, dim=-1)
        weights_TK = torch.softmax(top_TK, dim=-1)
    else:
        scores_TE = torch.sigmoid(logits_TE)
        probs_TE = normalise_rows(scores_TE)
        weights_TK, ids_TK = torch.topk(scores_TE, top_k, dim=-1)
        if normalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return RouterCapture(probs_TE=probs_TE, expert_ids_TK=ids_TK, weights_TK=weights_TK * scale, logits_TE=logits_TE)
