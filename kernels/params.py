"""Weights of one reference MoE layer (router + SwiGLU experts + optional shared expert).

Legend: D hidden, F ffn, E experts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moescope.kernels.config import MoEConfig


@dataclass
class RouterParams:
    """The two tensors the router reads; `route` accepts this or a full MoEParams."""

    router_weight_ED: Tensor
    router_bias_E: Tensor


@dataclass
class MoEParams:
    """logits_TE = x_TD @ router_weight_ED.T; expert e: y = (silu(x @ w_gate[e]) * (x @ w_up[e])) @ w_down[e].

    router_bias_E is the loss-free balancing correction added to the selection scores only;
    it is updated by a rule, never by gradient. Shared experts are concatenated along F.
    """

    router_weight_ED: Tensor
    router_bias_E: Tensor
    w_gate_EDF: Tensor
    w_up_EDF: Tensor
    w_down_EFD: Tensor
    shared_w_gate_DF: Tensor | None = None
    shared_w_up_DF: Tensor | None = None
    shared_w_down_FD: Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.w_gate_EDF.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.router_weight_ED.shape[1]

    @property
    def ffn_size(self) -> int:
        return self.w_gate_EDF.shape[2]

    @classmethod
    def init(cls, cfg: MoEConfig, hidden_size: int, ffn_size: int, *, generator: torch.Generator | None = None,
             dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> "MoEParams":
        """Random weights scaled 1/sqrt(fan_in) so activations keep unit scale; drawn in float32 on the
        generator's device, then cast, so a seed gives the same weights for every dtype/device."""
        if not isinstance(cfg, MoEConfig):
            raise TypeError(f"cfg must be a MoEConfig, got {type(cfg).__name__}")
        for name, value in (("hidden_size", hidden_size), ("ffn_size", ffn_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        gen_device = generator.device if generator is not None else torch.device("cpu")
        E, D, F = cfg.num_experts, hidden_size, ffn_size

        def randn(*shape, fan_in):
            w = torch.randn(*shape, generator=generator, device=gen_device, dtype=torch.float32) * fan_in ** -0.5
            return w.to(device=device if device is not None else gen_device, dtype=dtype)

        shared = {}
        if cfg.num_shared_experts:
            FS = F * cfg.num_shared_experts
            shared = dict(shared_w_gate_DF=randn(D, FS, fan_in=D), shared_w_up_DF=randn(D, FS, fan_in=D),
                          shared_w_down_FD=randn(FS, D, fan_in=FS))
        router_weight_ED = randn(E, D, fan_in=D)
        return cls(router_weight_ED=router_weight_ED,
                   router_bias_E=torch.zeros(E, dtype=torch.float32, device=router_weight_ED.device),
                   w_gate_EDF=randn(E, D, F, fan_in=D), w_up_EDF=randn(E, D, F, fan_in=D),
                   w_down_EFD=randn(E, F, D, fan_in=F), **shared)
