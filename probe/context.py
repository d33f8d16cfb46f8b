"""What the probe knows about the tokens of the forward call in flight.

Legend: B sequences, S positions of this call, M mask length (past + this call), T = B*S.

The top module's forward pre-hook reads the model's own inputs (input_ids,
attention_mask, cache_position) without touching their values on the host: the
tensors are kept by reference and copied to host memory later, with the captures.
"""
from __future__ import annotations

import inspect
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moescope.schema import check_run_id

__all__ = ["ForwardInputs", "StepContext", "read_inputs", "detect_rank", "check_run_id"]


@dataclass
class ForwardInputs:
    """The inputs of one top-level forward call, still on the device."""

    batch: int
    length: int                               # S
    input_ids_BS: torch.Tensor | None = None  # None when the model got inputs_embeds
    mask_BM: torch.Tensor | None = None       # 2-D attention mask, M >= S, or None
    cache_position_S: torch.Tensor | None = None
    valid_T: torch.Tensor | None = None       # float64 0/1 per flattened token (padding = 0)


@dataclass
class StepContext:
    """Labels stamped on every record; changed by set_step / set_checkpoint / set_domains."""

    run: str
    checkpoint: str
    step: int
    rank: int
    microbatch: int = 0
    domains: list | None = None
    probe_set: str | None = None  # the next forward's sequences are probe-set sequences
    probe_first: int = 0          # ... whose first is this index of the probe set
    generating: bool = False      # inside probe.generate(): phases become prefill / decode
    generate_calls: int = 0       # forwards so far in the current generate()
    generate_offset: int = 0      # positions already consumed in the current generate()
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def detect_rank() -> int:
    """torch.distributed rank when initialised, else env RANK, else 0."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return int(dist.get_rank())
    except Exception:  # noqa: BLE001 - a half-initialised process group must not stop the probe
        pass
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class InputReader:
    """Finds input_ids / attention_mask in a forward call, positional or keyword."""

    def __init__(self, model: nn.Module):
        try:
            params = list(inspect.signature(model.forward).parameters)
        except (TypeError, ValueError):
            params = []
        self.positions = {name: i for i, name in enumerate(params)}

    def get(self, name: str, args: tuple, kwargs: dict) -> Any:
        if name in kwargs:
            return kwargs[name]
        i = self.positions.get(name)
        if i is not None and i < len(args):
            return args[i]
        return None


def read_inputs(reader: InputReader, args: tuple, kwargs: dict) -> ForwardInputs | None:
    """Token context of one call; None when no token tensor can be found."""
    ids = reader.get("input_ids", args, kwargs)
    if not isinstance(ids, torch.Tensor) and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
        ids = args[0]
    embeds = reader.get("inputs_embeds", args, kwargs)
    if isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point():
        batch, length = ids.shape
    elif isinstance(ids, torch.Tensor) and ids.dim() == 1 and not ids.is_floating_point():
        ids = ids.unsqueeze(0)
        batch, length = ids.shape
    elif isinstance(embeds, torch.Tensor) and embeds.dim() == 3:
        ids = None
        batch, length = embeds.shape[:2]
    else:
        return None
    mask = reader.get("attention_mask", args, kwargs)
    # Only a plain 2-D padding mask that covers this call tells us which tokens are real.
    if not (isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == batch and mask.shape[1] >= length):
        mask = None
    cache_position = reader.get("cache_position", args, kwargs)
    if not (isinstance(cache_position, torch.Tensor) and cache_position.dim() == 1 and cache_position.numel() == length):
        cache_position = None
    valid_T = None
    if mask is not None:
        valid_T = (mask[:, mask.shape[1] - length:] != 0).reshape(-1).to(torch.float64)
    return ForwardInputs(batch, length, ids, mask, cache_position, valid_T)
