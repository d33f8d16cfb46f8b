"""Per-device load (METRICS.md §21): the run's expert -> device map applied to its exact expert loads.

Legend: E experts of a layer, G devices, S steps, L layers; tokens_SLG[s, l, d] the (token,
slot) assignments device d computed for layer l at step s.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from moescope.analysis.placement import fraction_EG, load_window, map_devices
from moescope.analysis.query import Scope, check_options
from moescope.device_map import DeviceMap, recorded, resolve


def recorded_map(store, run: str) -> DeviceMap | None:
    """The expert -> device map the run recorded at attach time, None when it recorded none."""
    return recorded(store.run_config(run), run)


def scoped_map(store, scope: Scope, meta: pd.DataFrame, expert_devices=None, ep_size=None) -> tuple[DeviceMap, list[int]]:
    """The map to use (an override, else the recorded one) and the layers it covers in the scope.

    With no layers asked for, the layers the map covers; asked-for layers it lacks are an error.
    """
    rows = meta[[scope.layers is None or int(x) in scope.layers for x in meta.layer]]
    if rows.empty:
        raise ValueError(f"run {scope.run!r} has none of layers {list(scope.layers or [])}")
    experts = dict(zip(rows.layer.astype(int), rows.E.astype(int)))
    dm = resolve(expert_devices, ep_size, experts, name="expert_devices")
    if dm is None:
        dm = recorded_map(store, scope.run)
    if dm is None:
        raise ValueError(f"run {scope.run!r} recorded no expert -> device map; pass expert_devices= (a device per "
                         "expert) or ep_size= (contiguous), or record one with attach(..., expert_devices= or ep_size=)")
    missing = sorted(set(experts) - set(dm.layers))
    if missing and scope.layers is not None:
        raise ValueError(f"run {scope.run!r}'s expert -> device map has no layer(s) {missing[:10]} "
                         f"(it maps layers {sorted(dm.layers)[:10]})")
    layers = sorted(set(experts) & set(dm.layers))
    if not layers:
        raise ValueError(f"run {scope.run!r}'s expert -> device map covers none of its layers {sorted(experts)[:10]}")
    for layer in layers:
        if len(dm.layers[layer]) < experts[layer]:
            raise ValueError(f"run {scope.run!r}'s expert -> device map lists {len(dm.layers[layer])} experts for "
                             f"layer {layer}, which has {experts[layer]}")
    return dm, layers


def fractions(dm: DeviceMap, layers: list[int], e_max: int) -> np.ndarray:
    """f_LEG[l, e, d]: the share of expert e's load that device d computes (replicas split it evenly)."""
    f_LEG = np.zeros((len(layers), e_max, dm.num_devices))
    for li, layer in enumerate(layers):
        e = len(dm.layers[layer])
        f_LEG[li, :e] = fraction_EG(map_devices(dm.layers[layer], e, dm.num_devices), e, dm.num_devices)
    return f_LEG


def _balance(mean, peak) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(peak > 0, mean / peak, np.nan), np.where(mean > 0, peak / mean, np.nan)


def device_load(store, scope: Scope, meta: pd.DataFrame, expert_devices=None, ep_size=None, combine_layers=False,
                **options) -> pd.DataFrame:
    """Tokens per device from the expert -> device map the run recorded, with balancedness and overload.

    Definition: METRICS.md §21; balancedness is the figure vLLM's and SGLang's EPLB log
    (DeepSeek-V3, DeepSeek-AI 2024, §3.4 on why it bounds an EP step).

    tokens_d = Σ_e load_e · r_e,d / r_e: expert e's exact (token, slot) assignments (expert_step,
    summed over ranks; dropped slots included, as in the placement what-if) split evenly over
    the r_e devices holding a replica. Per (step, layer): balancedness = mean_d tokens_d /
    max_d tokens_d, overload = max_d / mean_d. Over several groups (layers with
    combine_layers=True, steps with by="window") each group waits for its busiest device, so
    balancedness = Σ mean / Σ max (vLLM's figure over layers) and overload = Σ max / Σ mean.

    The map: the one recorded at attach time (attach(..., expert_devices=... or ep_size=N), or
    read from Megatron-Core's / DeepSpeed's expert-parallel group); options expert_devices (a
    device per expert for every layer, or {layer: list}; a list entry for replicas) or ep_size
    (contiguous) override it. No map: ValueError. Devices are 0..G-1 (ranks of the EP group).

    by="step": a row per (step, layer, device): tokens, balancedness, overload; with
    combine_layers=True a row per (step, device), tokens summed over the layers. by="window":
    a row per (layer, device) (or per device): tokens over the window, steps, balancedness,
    overload, and overload_max (the worst step's).
    """
    check_options("device_load", options, set())
    if not isinstance(combine_layers, bool):
        raise ValueError(f"combine_layers must be true or false, got {combine_layers!r}")
    dm, layers = scoped_map(store, scope, meta, expert_devices, ep_size)
    e_max = max(int(meta.E.max()), max(len(dm.layers[layer]) for layer in layers))
    window = load_window(store, scope, layers, e_max, scope.steps)
    tokens_SLG = np.einsum("sle,leg->slg", window.load_SLE, fractions(dm, window.layers.tolist(), e_max))
    seen_SL = window.load_SLE.sum(2) > 0  # a layer with no rows at a step is no group there
    mean_SL, max_SL = tokens_SLG.mean(2), tokens_SLG.max(2)
    g = dm.num_devices
    devices = np.arange(g)
    if combine_layers:
        tokens_SG = tokens_SLG.sum(1)
        bal_S, over_S = _balance(mean_SL.sum(1), max_SL.sum(1))
        if scope.by == "step":
            return pd.DataFrame({"step": np.repeat(window.steps, g), "device": np.tile(devices, len(window.steps)),
                                 "tokens": tokens_SG.ravel(), "balancedness": np.repeat(bal_S, g),
                                 "overload": np.repeat(over_S, g)})
        bal, over = _balance(mean_SL.sum(), max_SL.sum())
        return pd.DataFrame({"device": devices, "tokens": tokens_SG.sum(0), "steps": len(window.steps),
                             "balancedness": bal, "overload": over, "overload_max": np.nanmax(over_S)})
    bal_SL, over_SL = _balance(mean_SL, max_SL)
    if scope.by == "step":
        s, li = np.nonzero(seen_SL)
        return pd.DataFrame({"step": np.repeat(window.steps[s], g), "layer": np.repeat(window.layers[li], g),
                             "device": np.tile(devices, len(s)), "tokens": tokens_SLG[s, li].ravel(),
                             "balancedness": np.repeat(bal_SL[s, li], g), "overload": np.repeat(over_SL[s, li], g)})
    bal_L, over_L = _balance(mean_SL.sum(0), max_SL.sum(0))
    with np.errstate(invalid="ignore"):
        worst_L = np.nanmax(np.where(seen_SL, over_SL, np.nan), axis=0)
    n_l = len(window.layers)
    return pd.DataFrame({"layer": np.repeat(window.layers, g), "device": np.tile(devices, n_l),
                         "tokens": tokens_SLG.sum(0).ravel(), "steps": np.repeat(seen_SL.sum(0), g),
                         "balancedness": np.repeat(bal_L, g), "overload": np.repeat(over_L, g),
                         "overload_max": np.repeat(worst_L, g)})
