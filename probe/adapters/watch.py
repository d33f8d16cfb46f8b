"""Choose which discovered routers to record, as TransformerLens' names_filter does for hook points.

    attach(model, watch=[0, 3])                       # layer numbers
    attach(model, watch="model.layers.1*.mlp.*")      # a module-path glob (or a list of them)
    attach(model, watch=lambda site: site.layer % 2)  # a predicate over RouterSite

A glob matches a site's router path or the module its hook sits on.
"""
from __future__ import annotations

import fnmatch
from typing import Any, Callable, Sequence

from moescope.probe.adapters.base import RouterSite


def _matcher(watch: Any) -> Callable[[RouterSite], bool]:
    if callable(watch):
        return lambda site: bool(watch(site))
    items = [watch] if isinstance(watch, (str, int)) else list(watch) if isinstance(watch, (list, tuple, set, range)) else None
    if not items or any(isinstance(i, bool) or not isinstance(i, (str, int)) for i in items):
        raise ValueError(f"watch must be layer numbers, module-path globs or a predicate over RouterSite, got {watch!r}")
    layers = {i for i in items if isinstance(i, int)}
    globs = [i for i in items if isinstance(i, str)]

    def match(site: RouterSite) -> bool:
        paths = [site.module_path] + ([site.hook_module_path] if site.hook_module_path else [])
        return site.layer in layers or any(fnmatch.fnmatchcase(p, g) for g in globs for p in paths)

    return match


def select_sites(pairs: Sequence[tuple[Any, RouterSite]], watch: Any) -> list[tuple[Any, RouterSite]]:
    """The (adapter, site) pairs `watch` keeps; ValueError naming the routers found when it keeps none."""
    match = _matcher(watch)
    kept = [(a, s) for a, s in pairs if match(s)]
    if not kept:
        found = ", ".join(f"{s.layer}:{s.module_path}" for _, s in pairs[:6]) + (" ..." if len(pairs) > 6 else "")
        raise ValueError(f"watch={watch!r} matches none of the {len(pairs)} routers found ({found})")
    return kept
