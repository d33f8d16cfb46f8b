"""What an adapter hands the probe for one router call, and the adapter protocol.

Legend: T tokens (flattened batch*seq of that call), E experts, K slots per token.

An adapter recognises router modules of one MoE family and, from a forward hook on
that module (or on its parent block), reconstructs exactly what the model did: the
experts it ran each token through and the gate weights it applied. Everything stays
on the device; the probe's capture turns it into counts and frames without host sync.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn


@dataclass
class RouterCapture:
    """One router call, on the device, as the model really executed it.

    probs_TE: the full router distribution (softmax of logits, or the normalised
      sigmoid scores) used for entropy / Switch P_i; rows sum to 1.
    logits_TE: raw router logits (for logsumexp / z-loss); None when the family has none.
    expert_ids_TK: experts each token was dispatched to, slot 0 = largest gate weight;
      -1 marks an empty slot (expert-choice routing, where a token may get 0..E experts).
    weights_TK: gate weight actually applied for each slot (0 for empty slots).
    dropped_TK: True where capacity overflow stopped the slot from being computed;
      None means the family never drops.
    """

    probs_TE: torch.Tensor
    expert_ids_TK: torch.Tensor
    weights_TK: torch.Tensor
    logits_TE: torch.Tensor | None = None
    dropped_TK: torch.Tensor | None = None


@dataclass(frozen=True)
class RouterSite:
    """A router the probe will hook: where it is and what it is."""

    module_path: str          # e.g. "model.layers.3.mlp.gate"
    layer: int                # decoder block index in the model's own numbering
    num_experts: int
    top_k: int
    router_kind: str          # e.g. "softmax-topk", "sigmoid-group-topk", "switch-top1-capacity"
    capacity_factor: float | None = None
    hook_module_path: str | None = None  # module to hook when it differs from module_path


class Adapter(Protocol):
    """A family's adapter. `sites` finds its routers; `capture` reads one call.

    `capture(site, module, args, kwargs, output)` is called from a forward hook
    registered (with_kwargs=True) on `site.hook_module_path or site.module_path`.
    It must not change `output` and must not synchronise with the host.
    Optionally `expert_devices(model, site)`: the device (expert-parallel rank) of each of
    the site's experts, or None when the framework does not say (see moescope.probe.placement).
    """

    name: str

    def sites(self, model: nn.Module) -> list[RouterSite]: ...

    def capture(self, site: RouterSite, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> RouterCapture | None: ...
