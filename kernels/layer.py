"""One entry point for the reference MoE layer: route, then run the experts, on either backend.

Legend: T tokens, D hidden, E experts, K slots per token.
"""
from __future__ import annotations

from torch import Tensor

from moescope.kernels.config import MoEConfig
from moescope.kernels.experts import experts_forward
from moescope.kernels.params import MoEParams
from moescope.kernels.routing import Routing, check_inputs, route

BACKENDS = ("torch", "triton")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def triton_backend():
    """(route_triton, experts_triton), imported only when asked for so CPU users never need Triton."""
    try:
        from moescope.kernels.triton import experts_triton, route_triton
    except Exception as exc:  # ImportError, or Triton failing to initialise
        raise RuntimeError(f"backend='triton' is unavailable ({type(exc).__name__}: {exc}); "
                           f"use backend='torch'") from exc
    return route_triton, experts_triton


def moe_layer(x_TD: Tensor, params: MoEParams, cfg: MoEConfig, backend: str = "torch") -> tuple[Tensor, Routing]:
    """y_TD, routing = route + experts. backend "torch" is the oracle; "triton" the fused kernels."""
    check_backend(backend)
    if not isinstance(params, MoEParams):
        raise TypeError(f"params must be a MoEParams, got {type(params).__name__}")
    check_inputs(x_TD, params, cfg)
    if backend == "torch":
        routing = route(x_TD, params, cfg)
        return experts_forward(x_TD, routing, params, cfg), routing
    route_triton, experts_triton = triton_backend()
    routing = route_triton(x_TD, params, cfg)
    return experts_triton(x_TD, routing, params, cfg), routing
