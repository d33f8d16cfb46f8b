"""Helpers every adapter shares: layer numbering from module paths, top-k re-derivation.

Legend: T tokens, E experts, K slots per token.

Torch only (no transformers import), so the reference and declared adapters use it too.
"""
from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

_DIGIT = re.compile(r"^\d+$")


def _block_list_of(model: nn.Module, path: str) -> tuple[str, int] | None:
    """(path of the outermost ModuleList holding `path`, index inside it)."""
    parts = path.split(".")
    mod = model
    for i, part in enumerate(parts):
        if _DIGIT.match(part) and isinstance(mod, (nn.ModuleList, nn.Sequential)):
            return ".".join(parts[:i]), int(part)
        mod = getattr(mod, part, None)
        if mod is None:
            return None
    return None


def number_layers(model: nn.Module, paths: Iterable[str]) -> dict[str, int]:
    """Map each router path to its decoder-block index in the model's own numbering.

    Decoder-only models have one block list, so the index is the block index itself.
    Encoder-decoder models (Switch, NLLB-MoE) have two lists holding routers; the
    second list is offset by the length of the first so every layer number is unique.
    """
    paths = list(paths)
    found = {p: _block_list_of(model, p) for p in paths}
    lists = []
    for loc in found.values():
        if loc is not None and loc[0] not in lists:
            lists.append(loc[0])
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    lists.sort(key=lambda name: order.get(name, 0))
    offsets, total = {}, 0
    for name in lists:
        offsets[name] = total
        total += len(model.get_submodule(name))
    out = {}
    for i, p in enumerate(paths):
        loc = found[p]
        out[p] = offsets[loc[0]] + loc[1] if loc is not None else i
    return out


def parent_path(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def sort_slots(ids_TK: torch.Tensor, weights_TK: torch.Tensor, *extra_TK: torch.Tensor):
    """Reorder slots so slot 0 carries the largest gate weight (stable: ties keep order)."""
    order_TK = torch.argsort(weights_TK, dim=-1, descending=True, stable=True)
    out = [ids_TK.gather(-1, order_TK), weights_TK.gather(-1, order_TK)]
    out += [x.gather(-1, order_TK) for x in extra_TK]
    return tuple(out)


def normalise_rows(scores_TE: torch.Tensor) -> torch.Tensor:
    """Sigmoid scores as a distribution (METRICS.md: 'normalised sigmoid scores')."""
    return scores_TE / scores_TE.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(scores_TE.dtype).tiny)
