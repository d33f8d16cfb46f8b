"""What the framework adapters share to read expert parallelism: a site's enclosing modules, a group's size."""
from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from moescope.device_map import contiguous


def ancestors(model: nn.Module, path: str) -> Iterator[nn.Module]:
    """The modules enclosing `path`, nearest first (the model itself last)."""
    parts = path.split(".") if path else []
    for i in range(len(parts) - 1, -1, -1):
        yield model.get_submodule(".".join(parts[:i])) if i else model


def group_size(group) -> int | None:
    """Ranks in a torch.distributed process group (None for no group)."""
    if group is None:
        return None
    size = getattr(group, "size", None)
    return int(size()) if callable(size) else None


def contiguous_devices(num_experts: int, ep_size) -> list[int] | None:
    """Expert e on EP rank e // (E / G); None without expert parallelism (G of 1, or unknown)."""
    if ep_size is None or int(ep_size) <= 1 or num_experts % int(ep_size):
        return None
    return contiguous(num_experts, int(ep_size))
