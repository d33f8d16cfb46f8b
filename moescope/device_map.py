"""Where experts live: the expert → device map of each MoE layer, as attach() takes it and a run records it.

Legend: E experts of a layer, G devices (the ranks of one expert-parallel group, 0..G-1).

Forms a user may give (attach(..., expert_devices=...) and the device_load metric's override):
- a list with one entry per expert, the same for every layer: the device holding the expert
  (an int), or the devices holding its replicas (a list of ints; its load is split evenly);
- a dict {layer: such a list}, one per layer;
- ep_size=G instead: contiguous, expert e on device e // (E / G), the layout Megatron-Core,
  DeepSpeed and vLLM use by default.

A run records it in its config as {"expert_devices": {"source": ..., "num_devices": G,
"layers": {"<layer>": [...]}}}; `recorded()` reads it back and checks it, since a run's config
arrives in frames from anyone who can write to the store.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

CONFIG_KEY = "expert_devices"
MAX_DEVICES = 1 << 16

Entry = tuple[int, ...]          # the devices holding one expert (more than one: replicas)
LayerMap = list[Entry]           # expert e -> its devices


@dataclass(frozen=True)
class DeviceMap:
    """Per layer, the devices of each expert; devices are 0..num_devices-1."""

    layers: dict[int, LayerMap]
    num_devices: int
    source: str = "given"

    def to_config(self) -> dict:
        """The JSON form a run records (an expert on one device is a bare int)."""
        return {CONFIG_KEY: {"source": self.source, "num_devices": self.num_devices,
                             "layers": {str(layer): [e[0] if len(e) == 1 else list(e) for e in m]
                                        for layer, m in sorted(self.layers.items())}}}


def contiguous(num_experts: int, ep_size: int) -> list[int]:
    """Expert e on device e // (E / G)."""
    per = num_experts // ep_size
    return [e // per for e in range(num_experts)]


def _is_int(x) -> bool:
    return not isinstance(x, bool) and hasattr(x, "__index__")


def _plain(x):
    """numpy arrays and torch tensors as lists."""
    return x.tolist() if hasattr(x, "tolist") and not isinstance(x, (list, tuple)) else x


def _layer_map(entries, num_experts: int, where: str) -> LayerMap:
    entries = _plain(entries)
    if isinstance(entries, (str, bytes, Mapping)) or not isinstance(entries, (list, tuple)):
        raise ValueError(f"{where} must list one device per expert, got {str(entries)[:80]}")
    if len(entries) != num_experts:
        raise ValueError(f"{where} lists {len(entries)} experts but the layer has {num_experts}")
    out = []
    for expert, entry in enumerate(entries):
        entry = _plain(entry)
        devices = list(entry) if isinstance(entry, (list, tuple)) else [entry]
        if not devices or not all(_is_int(d) and 0 <= int(d) < MAX_DEVICES for d in devices):
            raise ValueError(f"{where} puts expert {expert} on {entry!r}; a device is an int 0..{MAX_DEVICES - 1} "
                             "(or a list of them for replicas)")
        out.append(tuple(int(d) for d in devices))
    return out


def resolve(expert_devices=None, ep_size=None, experts: Mapping[int, int] | None = None, *,
            name: str = "expert_devices", source: str = "given") -> DeviceMap | None:
    """The map for the layers in `experts` (layer -> E) from a user's expert_devices or ep_size; None when neither.

    Raises ValueError with one line naming what is wrong. A dict may name more layers than
    `experts` (e.g. a probe watching some layers); those are left out.
    """
    experts = dict(experts or {})
    if expert_devices is None and ep_size is None:
        return None
    if expert_devices is not None and ep_size is not None:
        raise ValueError(f"give {name}= or ep_size=, not both")
    if ep_size is not None:
        if not _is_int(ep_size) or not 1 <= int(ep_size) < MAX_DEVICES:
            raise ValueError(f"ep_size must be an int >= 1, got {ep_size!r}")
        g = int(ep_size)
        for layer, e in sorted(experts.items()):
            if e % g:
                raise ValueError(f"ep_size {g} does not divide layer {layer}'s {e} experts")
        return DeviceMap({layer: [(d,) for d in contiguous(e, g)] for layer, e in experts.items()}, g, "ep_size")
    if isinstance(expert_devices, Mapping):
        if not all(_is_int(k) for k in expert_devices):
            raise ValueError(f"{name} keys must be layer ints, got {sorted(map(str, expert_devices))[:8]}")
        given = {int(k): v for k, v in expert_devices.items()}
        missing = sorted(set(experts) - set(given))
        if missing:
            raise ValueError(f"{name} has no map for layer(s) {missing[:10]} (it names layers {sorted(given)[:10]})")
        layers = {layer: _layer_map(given[layer], e, f"{name}[{layer}]") for layer, e in experts.items()}
    else:
        layers = {layer: _layer_map(expert_devices, e, f"{name} (layer {layer})") for layer, e in experts.items()}
    return DeviceMap(layers, max((d for m in layers.values() for e in m for d in e), default=0) + 1, source)


def recorded(run_config: Mapping | None, run: str = "") -> DeviceMap | None:
    """The map a run recorded (None when it recorded none); ValueError when the record is malformed."""
    raw = (run_config or {}).get(CONFIG_KEY)
    if raw is None:
        return None
    bad = f"run {run!r} recorded a malformed expert -> device map"
    if not isinstance(raw, Mapping) or not isinstance(raw.get("layers"), Mapping):
        raise ValueError(f"{bad}: no 'layers' object")
    g = raw.get("num_devices")
    if not _is_int(g) or not 1 <= int(g) <= MAX_DEVICES:
        raise ValueError(f"{bad}: num_devices {g!r}")
    layers = {}
    for key, entries in raw["layers"].items():
        if not str(key).isdigit() or not isinstance(entries, list):
            raise ValueError(f"{bad}: layer {str(key)[:20]!r}")
        layer_map = _layer_map(entries, len(entries), f"{bad}: layer {key}")
        if any(d >= int(g) for e in layer_map for d in e):
            raise ValueError(f"{bad}: layer {key} names a device >= num_devices {g}")
        layers[int(key)] = layer_map
    return DeviceMap(layers, int(g), str(raw.get("source", "given"))[:40])
