"""transformers (v5) routers that return (router_logits, top_k_weights, top_k_index).

Legend: T tokens, E experts, K slots per token.

In transformers 5 most MoE families split the block into a router module and a fused
`*Experts` module, and the block hands the router's weights and indices to the experts
unchanged. Hooking the router therefore reads the exact decision, whatever rule made it
(softmax-top-k, top-k-softmax, DeepSeek's group-limited sigmoid with correction bias and
routed scaling, PhiMoE's sparsemixer, ...): we never re-derive, we copy. Only the full
distribution probs_TE is computed here, with the family's scoring function.

Scoring "probs" (Gemma4): the router's first output already is the softmax distribution,
so it is recorded as probs_TE and logits_TE stays None.

Zero-computation experts (LongcatFlash): the router scores E = n_routed + zero_expert_num
columns and a token may pick an id >= n_routed, which the experts module passes through
as identity (the token's hidden state times its gate). Those slots are recorded with
their own id, not dropped (they were applied): the site's num_experts counts all E
columns, so ids n_routed..E-1 are the zero-computation experts.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moescope.probe.adapters.base import RouterCapture, RouterSite
from moescope.probe.adapters.hf_common import normalise_rows, number_layers, sort_slots

# Router class -> (scoring of the full distribution, router_kind). Verified families first.
SOFTMAX_TOPK = "softmax-topk"
TOPK_SOFTMAX = "topk-softmax"
SIGMOID_GROUP = "sigmoid-group-topk"
SIGMOID_TOPK = "sigmoid-topk"

ROUTERS: dict[str, tuple[str, str]] = {
    "MixtralTopKRouter": ("softmax", SOFTMAX_TOPK),
    "Qwen2MoeTopKRouter": ("softmax", SOFTMAX_TOPK),
    "Qwen3MoeTopKRouter": ("softmax", SOFTMAX_TOPK),
    "Qwen3NextTopKRouter": ("softmax", SOFTMAX_TOPK),
    "Qwen3_5MoeTopKRouter": ("softmax", SOFTMAX_TOPK),
    "Qwen3VLMoeTextTopKRouter": ("softmax", SOFTMAX_TOPK),
    "Qwen3OmniMoeTextTopKRouter": ("softmax", SOFTMAX_TOPK),
    "Qwen3OmniMoeThinkerTextTopKRouter": ("softmax", SOFTMAX_TOPK),
    "Qwen3OmniMoeTalkerTextTopKRouter": ("softmax", SOFTMAX_TOPK),
    "OlmoeTopKRouter": ("softmax", SOFTMAX_TOPK),
    "FlexOlmoTopKRouter": ("softmax", SOFTMAX_TOPK),
    "MiniMaxTopKRouter": ("softmax", SOFTMAX_TOPK),
    "JambaTopKRouter": ("softmax", SOFTMAX_TOPK),
    "HunYuanMoEV1Gate": ("softmax", SOFTMAX_TOPK),
    "Ernie4_5_MoeTopKRouter": ("softmax", SOFTMAX_TOPK),
    "AriaTextTopKRouter": ("softmax", SOFTMAX_TOPK),
    "DeepseekV2TopkRouter": ("softmax", "softmax-group-topk"),
    "Mistral4TopkRouter": ("softmax", "softmax-group-topk"),
    "MistralLarge4TextTopkRouter": ("softmax", "softmax-group-topk"),
    "LongcatFlashTopkRouter": ("softmax", "softmax-topk-zero-experts"),
    "Gemma4TextRouter": ("probs", SOFTMAX_TOPK),
    "GptOssTopKRouter": ("softmax", TOPK_SOFTMAX),
    "GraniteMoeTopKRouter": ("softmax", TOPK_SOFTMAX),
    "GraniteMoeSharedTopKRouter": ("softmax", TOPK_SOFTMAX),
    "GraniteMoeHybridTopKRouter": ("softmax", TOPK_SOFTMAX),
    "GraniteMoeSWATopKRouter": ("softmax", TOPK_SOFTMAX),
    "PhimoeTopKRouter": ("softmax", "sparsemixer-top2"),
    "DeepseekV3TopkRouter": ("sigmoid", SIGMOID_GROUP),
    "DeepseekV32TopkRouter": ("sigmoid", SIGMOID_GROUP),
    "Dots1TopkRouter": ("sigmoid", SIGMOID_GROUP),
    "Glm4MoeTopkRouter": ("sigmoid", SIGMOID_GROUP),
    "Glm4MoeLiteTopkRouter": ("sigmoid", SIGMOID_GROUP),
    "Glm4vMoeTextTopkRouter": ("sigmoid", SIGMOID_GROUP),
    "GlmMoeDsaTopkRouter": ("sigmoid", SIGMOID_GROUP),
    "ExaoneMoeTopkRouter": ("sigmoid", SIGMOID_GROUP),
    "KimiLinearTopkRouter": ("sigmoid", SIGMOID_GROUP),
    "MiMoV2FlashTopkRouter": ("sigmoid", SIGMOID_GROUP),
    "NemotronHTopkRouter": ("sigmoid", SIGMOID_GROUP),
    "SolarOpenTopkRouter": ("sigmoid", SIGMOID_GROUP),
    "BailingHybridTopkRouter": ("sigmoid", SIGMOID_GROUP),
    "HYV4TopkRouter": ("sigmoid", SIGMOID_GROUP),
    "MiniMaxM2TopKRouter": ("sigmoid", SIGMOID_TOPK),
    "Step3p7TopKRouter": ("sigmoid", SIGMOID_TOPK),
    "LagunaTopKRouter": ("sigmoid", SIGMOID_TOPK),
    "Lfm2MoeTopKRouter": ("sigmoid", SIGMOID_TOPK),
    "HYV3TopKRouter": ("sigmoid", SIGMOID_TOPK),
    "Cohere2MoeTopKRouter": ("config", TOPK_SOFTMAX),
}


# Routers whose logits are wider than their `num_experts` attribute says.
_WIDTH_ATTR = {"LongcatFlashTopkRouter": "n_routed_experts"}


def _num_experts(router: nn.Module) -> int:
    width = _WIDTH_ATTR.get(type(router).__name__)
    if width is not None:
        return int(getattr(router, width))
    for name in ("num_experts", "n_routed_experts", "num_local_experts"):
        value = getattr(router, name, None)
        if isinstance(value, int):
            return value
    weight = getattr(router, "weight", None)
    if isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    linear = next(m for m in router.modules() if isinstance(m, nn.Linear))
    return int(linear.out_features)


def _top_k(router: nn.Module) -> int:
    for name in ("top_k", "num_experts_per_tok"):
        value = getattr(router, name, None)
        if isinstance(value, int):
            return value
    config = router.config
    return int(getattr(config, "num_experts_per_tok", None) or config.top_k_experts)


def _scoring(router: nn.Module, scoring: str) -> str:
    if scoring == "config":
        # Cohere2-MoE chooses its scoring function in the config.
        return getattr(router, "expert_selection_fn", "softmax")
    return scoring


def full_distribution(logits_TE: torch.Tensor, scoring: str) -> torch.Tensor:
    logits_TE = logits_TE.float()
    if scoring == "sigmoid":
        return normalise_rows(torch.sigmoid(logits_TE))
    return torch.softmax(logits_TE, dim=-1)


class HFTopKRouterAdapter:
    """Routers whose output is (logits_TE, weights_TK, ids_TK) fed unchanged to the experts."""

    name = "hf-topk"

    def __init__(self, routers: dict[str, tuple[str, str]] | None = None) -> None:
        self.routers = dict(ROUTERS if routers is None else routers)
        self._scoring: dict[str, str] = {}

    def sites(self, model: nn.Module) -> list[RouterSite]:
        found = [
            (p, m) for p, m in model.named_modules()
            if type(m).__name__ in self.routers and type(m).__module__.startswith("transformers.")
        ]
        layers = number_layers(model, [p for p, _ in found])
        sites = []
        for path, mod in found:
            scoring, kind = self.routers[type(mod).__name__]
            scoring = _scoring(mod, scoring)
            self._scoring[path] = scoring
            sites.append(RouterSite(
                module_path=path, layer=layers[path], num_experts=_num_experts(mod), top_k=_top_k(mod),
                router_kind=kind if scoring != "sigmoid" or kind != TOPK_SOFTMAX else "topk-sigmoid",
            ))
        return sites

    def capture(self, site: RouterSite, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> RouterCapture | None:
        logits, weights, ids = output[0], output[1], output[2]
        first_TE = logits.detach().reshape(-1, site.num_experts)
        tokens = first_TE.shape[0]
        ids_TK, weights_TK = sort_slots(ids.detach().reshape(tokens, -1), weights.detach().reshape(tokens, -1).float())
        scoring = self._scoring.get(site.module_path, self.routers[type(module).__name__][0])
        if scoring == "probs":
            return RouterCapture(probs_TE=first_TE.float(), expert_ids_TK=ids_TK, weights_TK=weights_TK)
        return RouterCapture(
            probs_TE=full_distribution(first_TE, scoring),
            expert_ids_TK=ids_TK,
            weights_TK=weights_TK,
            logits_TE=first_TE,
        )
