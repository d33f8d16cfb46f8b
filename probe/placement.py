"""Where the probed model's experts live, recorded with the run so per-device load can be charted.

Given at attach time (expert_devices= or ep_size=, see moescope.device_map), or else read
from the framework through the adapter that found each router: an adapter may define
`expert_devices(model, site)` returning the device (rank in the expert-parallel group) of
each of the site's experts, or None when it cannot tell. Megatron-Core and DeepSpeed do,
from the MoE layer's expert-parallel group; a group of one device records nothing.
"""
from __future__ import annotations

import logging
from typing import Any

from torch import nn

from moescope.device_map import DeviceMap, resolve
from moescope.probe.adapters.base import Adapter, RouterSite

log = logging.getLogger("moescope.probe")


def _from_framework(model: nn.Module, pairs: list[tuple[Adapter, Any]]) -> DeviceMap | None:
    given, sources = {}, set()
    for adapter, site in pairs:
        read = getattr(adapter, "expert_devices", None)
        if read is None:
            continue
        try:
            devices = read(model, site)
        except Exception as exc:  # noqa: BLE001 - a framework we misread must not stop attach()
            log.warning("moescope probe: could not read where %s's experts live (%s: %s); no device map recorded",
                        site.module_path, type(exc).__name__, exc)
            return None
        if devices is not None:
            given[site.layer] = devices
            sources.add(getattr(adapter, "name", type(adapter).__name__))
    if not given:
        return None
    experts = {site.layer: site.num_experts for _, site in pairs if site.layer in given}
    try:
        return resolve(given, experts=experts, source="+".join(sorted(sources)))
    except ValueError as exc:
        log.warning("moescope probe: the framework's expert map does not fit the routers (%s); none recorded", exc)
        return None


def device_map_config(model: nn.Module, pairs: list[tuple[Adapter, RouterSite]], expert_devices=None,
                      ep_size=None) -> dict:
    """The run-config entry for the map ({} when none is known); ValueError for a bad expert_devices / ep_size."""
    if expert_devices is None and ep_size is None:
        found = _from_framework(model, pairs)
        return found.to_config() if found is not None else {}
    experts: dict[int, int] = {}
    for _, site in pairs:
        if experts.setdefault(site.layer, site.num_experts) != site.num_experts:
            raise ValueError(f"layer {site.layer} has routers with {experts[site.layer]} and {site.num_experts} "
                             "experts; one expert map per layer cannot describe both")
    return resolve(expert_devices, ep_size, experts).to_config()
