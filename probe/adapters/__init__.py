"""Router adapters: find every router of a model and read what it decided.

    from moescope.probe.adapters import discover, RouterSpec
    for adapter, site in discover(model):            # or discover(model, spec=RouterSpec(...))
        module = model.get_submodule(site.hook_module_path or site.module_path)
        module.register_forward_hook(partial(adapter.capture, site), with_kwargs=True)  # sketch

Adapters are tried in registry order; a module claimed by an earlier adapter is not
offered to later ones. With `spec`, only the declared routers are used: the user said
exactly which modules route, and auto-detection must not second-guess that.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

from torch import nn

from moescope.probe.adapters.base import Adapter, RouterCapture, RouterSite
from moescope.probe.adapters.declared import DeclaredAdapter, RouterSpec
from moescope.probe.adapters.reference import ReferenceAdapter

__all__ = [
    "Adapter", "RouterCapture", "RouterSite", "RouterSpec", "NoRouterFound",
    "ADAPTERS", "register", "discover",
]


class NoRouterFound(ValueError):
    """No adapter recognised a router in the model, and no spec declared one."""


def _default_adapters() -> list[Adapter]:
    from moescope.probe.adapters.deepspeed import DeepSpeedAdapter
    from moescope.probe.adapters.hf import HF_ADAPTERS
    from moescope.probe.adapters.megatron import MegatronAdapter  # imports no megatron itself
    from moescope.probe.adapters.structural import ExpertsInputAdapter, TopkTraceAdapter
    from moescope.probe.adapters.torchtitan import TorchTitanAdapter

    # Structural detection last: it claims only modules no explicit adapter recognised.
    return [ReferenceAdapter(), *HF_ADAPTERS, DeepSpeedAdapter(), MegatronAdapter(), TorchTitanAdapter(),
            ExpertsInputAdapter(), TopkTraceAdapter()]


ADAPTERS: list[Adapter] = _default_adapters()


def register(adapter: Adapter, first: bool = True) -> None:
    """Add an adapter; by default it is tried before the bundled ones."""
    if first:
        ADAPTERS.insert(0, adapter)
    else:
        ADAPTERS.append(adapter)


_RELEVANT = ("router", "gate", "moe", "expert", "sparse", "switch", "mlp", "ffn", "feedforward")


def _class_summary(model: nn.Module, limit: int = 8) -> str:
    counts = Counter(type(m).__name__ for m in model.modules())

    def rank(name: str) -> tuple:
        low = name.lower()
        hit = next((i for i, word in enumerate(_RELEVANT) if word in low), len(_RELEVANT))
        return (hit, -counts[name], name)

    names = sorted(counts, key=rank)
    shown = ", ".join(names[:limit])
    more = f", ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return shown + more


def discover(model: nn.Module, spec: RouterSpec | Sequence[RouterSpec] | None = None) -> list[tuple[Adapter, RouterSite]]:
    """Every router site of `model` with the adapter that reads it, sorted by (layer, path).

    Raises NoRouterFound when nothing matches, and ValueError when a spec does not fit.
    """
    if spec is not None:
        specs = [spec] if isinstance(spec, RouterSpec) else list(spec)
        found: list[tuple[Adapter, RouterSite]] = []
        for s in specs:
            adapter = DeclaredAdapter(s)
            found += [(adapter, site) for site in adapter.sites(model)]
        return sorted(found, key=lambda pair: (pair[1].layer, pair[1].module_path))

    found, claimed, explicit_layers = [], set(), set()
    for adapter in ADAPTERS:
        structural = getattr(adapter, "name", "").startswith("structural")
        for site in adapter.sites(model):
            key = site.hook_module_path or site.module_path
            if site.module_path in claimed or key in claimed:
                continue
            if structural and site.layer in explicit_layers:
                continue  # a second router on a layer an adapter already reads would merge with it
            if not structural:
                explicit_layers.add(site.layer)
            claimed.update({site.module_path, key})
            found.append((adapter, site))
    if not found:
        raise NoRouterFound(
            f"no MoE router recognised in {type(model).__name__}; module classes seen: {_class_summary(model)}. "
            "Declare the router with discover(model, spec=RouterSpec(module='layers.*.mlp.gate', "
            "num_experts=E, top_k=K, rule='softmax-topk'))"
        )
    return sorted(found, key=lambda pair: (pair[1].layer, pair[1].module_path))
