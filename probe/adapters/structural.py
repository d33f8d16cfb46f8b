"""Routers found by what they do, not by class name: the fallback when no adapter claims a module.

Legend: T tokens, E experts, K slots per token, H hidden.

Two shapes of MoE are recognised from the module graph:

- ExpertsInputAdapter: a fused experts module whose forward takes (hidden, ids, weights),
  as transformers 5 builds most families (`MixtralExperts(hidden_states, top_k_index,
  top_k_weights)`). The hook sits on the experts module and records the ids and weights it
  actually received, so the record is the decision as executed whatever rule made it. The
  router is the sibling that projects to E scores (an nn.Linear with E outputs, or a module
  whose 2-D weight has E rows); a helper hook keeps its (T, E) output for the distribution.
- TopkTraceAdapter: user code with a plain `nn.Linear(H, E)` gate and `torch.topk` in the
  block's forward, next to E expert modules (a ModuleList of E, or parameters with a
  leading E dimension). While that block runs, a TorchFunctionMode sees the gate's output
  and the first top-k over E scores; the weights are the last (T, K) tensor derived from
  the top-k values before the block ends (so renormalisation or a softmax over the k
  values is included).

The distribution probs_TE is the softmax of the router's scores: a structural site does not
know the family's scoring function, so router_kind is "structural" and the ids and weights,
not the distribution, are the exact part. Families whose decisions these cannot see
(capacity drops, zero-computation experts, hash routing) keep their explicit adapters,
which run first.
"""
from __future__ import annotations

import inspect
import re
from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from moescope.probe.adapters.base import RouterCapture, RouterSite
from moescope.probe.adapters.hf_common import number_layers, parent_path, sort_slots

_IDS_NAME = re.compile(r"index|indices|ids|selected|expert_idx|routing_map")
_WEIGHTS_NAME = re.compile(r"weight|scores|gates|probs|routing_map")
_TOP_K_ATTRS = ("top_k", "num_experts_per_tok", "moe_topk", "moe_k", "num_experts_per_token", "router_topk", "k")
_E_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")

HelperHook = tuple[str, str, Callable]  # (module path, "pre" | "post", hook)


def _int_attr(obj: Any, names: tuple[str, ...]) -> int | None:
    for name in names:
        try:
            value = getattr(obj, name, None)
        except Exception:  # noqa: BLE001 - some configs raise on ambiguous per-layer attributes
            value = None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _experts_signature(module: nn.Module) -> tuple[int, int] | None:
    """(position of ids, position of weights) among forward's parameters after hidden, or None."""
    try:
        params = [p for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return None
    names = [p.name for p in params]
    if len(names) < 3:
        return None
    ids_at = next((i for i, n in enumerate(names[1:3], 1) if _IDS_NAME.search(n)), None)
    w_at = next((i for i, n in enumerate(names[1:3], 1) if i != ids_at and _WEIGHTS_NAME.search(n)), None)
    if ids_at is None or w_at is None:
        return None
    return ids_at, w_at


def _leading_experts(module: nn.Module) -> int | None:
    """E of an experts container: an attribute, a ModuleList length or a 3-D parameter's first dim."""
    value = _int_attr(module, _E_ATTRS)
    if value is not None:
        return value
    if isinstance(module, nn.ModuleList) and len(module) >= 2:
        return len(module)
    dims = {p.shape[0] for p in module.parameters(recurse=False) if p.dim() == 3}
    return dims.pop() if len(dims) == 1 else None


def _router_of(parent: nn.Module, skip: nn.Module, num_experts: int) -> str | None:
    """Name of the parent's child that projects to num_experts scores (first match)."""
    for name, child in parent.named_children():
        if child is skip:
            continue
        if isinstance(child, nn.Linear):
            if child.out_features == num_experts:
                return name
            continue
        weight = getattr(child, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] == num_experts:
            return name
        inner = [m for m in child.children() if isinstance(m, nn.Linear) and m.out_features == num_experts]
        if len(inner) == 1 and len(list(child.children())) <= 2:
            return name
    return None


def _top_k_near(model: nn.Module, *modules: nn.Module) -> int:
    for mod in modules:
        value = _int_attr(mod, _TOP_K_ATTRS)
        if value is not None:
            return value
    config = getattr(model, "config", None)
    if config is not None:
        try:
            config = config.get_text_config()
        except Exception:  # noqa: BLE001
            pass
        value = _int_attr(config, _TOP_K_ATTRS)
        if value is not None:
            return value
    return 0  # unknown until the first call; every recorded row carries its real K slots


def _scores_of(output: Any, num_experts: int) -> torch.Tensor | None:
    """The router's (..., E) float output: the tensor itself or the first such tuple element."""
    items = output if isinstance(output, (tuple, list)) else (output,)
    for item in items:
        if isinstance(item, torch.Tensor) and item.is_floating_point() and item.dim() >= 1 \
                and item.shape[-1] == num_experts:
            return item
    return None


def _distribution(scores_TE: torch.Tensor | None, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                  num_experts: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(probs_TE, logits_TE): softmax of the router's scores, or the applied weights spread over E."""
    if scores_TE is not None and scores_TE.shape[0] == ids_TK.shape[0]:
        scores_TE = scores_TE.detach()
        return torch.softmax(scores_TE.float(), dim=-1), scores_TE
    dense_TE = torch.zeros(ids_TK.shape[0], num_experts, device=weights_TK.device)
    dense_TE.scatter_add_(1, ids_TK.clamp(0, num_experts - 1).long(), weights_TK.abs() * (ids_TK >= 0))
    return dense_TE / dense_TE.sum(-1, keepdim=True).clamp_min(torch.finfo(dense_TE.dtype).tiny), None


class ExpertsInputAdapter:
    """Experts modules called as experts(hidden, ids, weights): record what they received."""

    name = "structural-experts"

    def __init__(self) -> None:
        self._positions: dict[type, tuple[int, int]] = {}  # experts class -> (ids, weights) argument positions
        self._scores: dict[str, torch.Tensor] = {}   # site path -> router's last (T, E) output

    def sites(self, model: nn.Module) -> list[RouterSite]:
        found = []
        for path, mod in model.named_modules():
            if not path or type(mod).__module__.startswith("torch."):
                continue
            positions = _experts_signature(mod)
            num_experts = _leading_experts(mod) if positions is not None else None
            if num_experts is None:
                continue
            parent = model.get_submodule(parent_path(path)) if "." in path else model
            router = _router_of(parent, mod, num_experts)
            router_path = f"{parent_path(path)}.{router}" if router and "." in path else router
            found.append((router_path or path, path, num_experts, positions,
                          _top_k_near(model, *(m for m in (parent.get_submodule(router) if router else None, parent, mod)
                                               if m is not None))))
        layers = number_layers(model, [f[1] for f in found])
        sites = []
        for site_path, experts_path, num_experts, positions, top_k in found:
            self._positions[type(model.get_submodule(experts_path))] = positions
            sites.append(RouterSite(module_path=site_path, layer=layers[experts_path], num_experts=num_experts,
                                    top_k=top_k, router_kind="structural", hook_module_path=experts_path))
        return sites

    def helper_hooks(self, site: RouterSite) -> list[HelperHook]:
        """A hook on the router that keeps its scores for the distribution; none when no router was found."""
        if site.module_path == site.hook_module_path:
            return []

        def keep_scores(module, args, output, key=site.module_path, width=site.num_experts):
            scores = _scores_of(output, width)
            if scores is not None:
                self._scores[key] = scores.detach().reshape(-1, width)

        return [(site.module_path, "post", keep_scores)]

    def capture(self, site: RouterSite, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> RouterCapture | None:
        positions = self._positions.get(type(module))
        if positions is None:
            positions = self._positions[type(module)] = _experts_signature(module)
        ids_at, w_at = positions
        if len(args) > max(ids_at, w_at):
            ids, weights = args[ids_at], args[w_at]
        else:
            bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
            values = list(bound.values())
            ids, weights = values[ids_at], values[w_at]
        ids = ids.detach()
        ids_TK = ids.reshape(-1, ids.shape[-1]) if ids.dim() > 1 else ids.reshape(-1, 1)
        tokens = ids_TK.shape[0]
        weights = weights.detach().reshape(tokens, -1)
        if weights.shape[1] == site.num_experts and ids_TK.shape[1] != site.num_experts:
            weights = weights.gather(1, ids_TK.clamp_min(0).long())  # dense (T, E) gates: the chosen columns
        ids_TK, weights_TK = sort_slots(ids_TK, weights.float())
        scores = self._scores.pop(site.module_path, None)
        probs_TE, logits_TE = _distribution(scores, ids_TK, weights_TK, site.num_experts)
        return RouterCapture(probs_TE=probs_TE, expert_ids_TK=ids_TK, weights_TK=weights_TK, logits_TE=logits_TE)


_FACTORIES = {"zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like"}


class _TopkRecorder(TorchFunctionMode):
    """Inside one block's forward: the gate's scores, the first top-k over E, its derived weights."""

    def __init__(self, gate_weight: torch.Tensor, num_experts: int):
        super().__init__()
        self.gate_weight, self.num_experts = gate_weight, num_experts
        self.scores_TE: torch.Tensor | None = None
        self.ids_TK: torch.Tensor | None = None
        self.weights_TK: torch.Tensor | None = None
        self._lineage: list[torch.Tensor] = []  # strong refs, so ids stay unique while the block runs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if self.scores_TE is None and name == "linear" and len(args) > 1 and args[1] is self.gate_weight:
            self.scores_TE = out
        elif self.ids_TK is None and name == "topk" and isinstance(args[0], torch.Tensor) \
                and args[0].shape[-1] == self.num_experts:
            values, indices = out[0], out[1]
            self.ids_TK, self.weights_TK = indices.detach(), values.detach().clone()
            self._lineage.append(values)
        elif self._lineage and isinstance(out, torch.Tensor) and name not in _FACTORIES \
                and out.shape == self.weights_TK.shape and out.is_floating_point():
            flat = list(args) + list(kwargs.values())
            if any(isinstance(a, torch.Tensor) and any(a is t for t in self._lineage) for a in flat):
                self.weights_TK = out.detach().clone()  # snapshot: later in-place edits are not applied gates
                self._lineage.append(out)
        return out


def _calls_topk(block: nn.Module) -> bool:
    """The block's own forward source calls top-k (so a classifier head of width E is not a gate)."""
    try:
        return "topk" in inspect.getsource(type(block).forward)
    except (OSError, TypeError):
        return False


class TopkTraceAdapter:
    """User-code MoE blocks: an nn.Linear(H, E) gate, E experts, torch.topk in forward."""

    name = "structural-topk"

    def __init__(self) -> None:
        self._active: dict[str, _TopkRecorder] = {}
        self._done: dict[str, _TopkRecorder] = {}
        self._gates: dict[str, str] = {}

    def sites(self, model: nn.Module) -> list[RouterSite]:
        found = []
        for path, block in model.named_modules():
            if type(block).__module__.startswith("torch."):
                continue
            children = dict(block.named_children())
            sizes = {_leading_experts(c) for c in children.values() if not isinstance(c, nn.Linear)}
            sizes |= {p.shape[0] for p in block.parameters(recurse=False) if p.dim() == 3}
            gates = [n for n, c in children.items() if isinstance(c, nn.Linear) and c.out_features in sizes
                     and c.out_features >= 2]
            if len(gates) != 1 or not _calls_topk(block):
                continue
            found.append((path, gates[0], children[gates[0]].out_features,
                          _top_k_near(model, children[gates[0]], block)))
        gate_paths = [f"{p}.{g}" if p else g for p, g, _, _ in found]
        layers = number_layers(model, gate_paths)
        sites = []
        for (path, gate, num_experts, top_k), gate_path in zip(found, gate_paths):
            self._gates[gate_path] = gate
            sites.append(RouterSite(module_path=gate_path, layer=layers[gate_path], num_experts=num_experts,
                                    top_k=top_k, router_kind="structural", hook_module_path=path))
        return sites

    def helper_hooks(self, site: RouterSite) -> list[HelperHook]:
        """Enter the recording mode when the block starts, leave it when the block ends (even on error)."""
        key = site.module_path

        def enter(module, args, kwargs=None):
            gate = getattr(module, self._gates.get(key, ""), None)
            if gate is None:
                return None
            mode = _TopkRecorder(gate.weight, site.num_experts)
            mode.__enter__()
            self._active[key] = mode
            return None

        def leave(module, args, output):
            mode = self._active.pop(key, None)
            if mode is not None:
                mode.__exit__(None, None, None)
                self._done[key] = mode

        return [(site.hook_module_path, "pre", enter), (site.hook_module_path, "post", leave)]

    def capture(self, site: RouterSite, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> RouterCapture | None:
        mode = self._done.pop(site.module_path, None)
        if mode is None or mode.ids_TK is None:
            return None
        ids_TK = mode.ids_TK.reshape(-1, mode.ids_TK.shape[-1])
        ids_TK, weights_TK = sort_slots(ids_TK, mode.weights_TK.reshape(ids_TK.shape).float())
        scores = mode.scores_TE.detach().reshape(-1, site.num_experts) if mode.scores_TE is not None else None
        probs_TE, logits_TE = _distribution(scores, ids_TK, weights_TK, site.num_experts)
        return RouterCapture(probs_TE=probs_TE, expert_ids_TK=ids_TK, weights_TK=weights_TK, logits_TE=logits_TE)


def register_helper_hooks(model: nn.Module, adapter: Any, site: RouterSite) -> list:
    """Register an adapter's helper hooks for one site; returns the handles. Post hooks always run."""
    handles = []
    for path, kind, fn in getattr(adapter, "helper_hooks", lambda s: [])(site):
        module = model.get_submodule(path) if path else model
        fn = torch.compiler.disable(fn)
        if kind == "pre":
            handles.append(module.register_forward_pre_hook(fn))
        else:
            handles.append(module.register_forward_hook(fn, always_call=True))
    return handles
