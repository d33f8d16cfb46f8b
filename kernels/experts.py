"""The reference expert computation: per-expert gather, SwiGLU, weighted scatter-add, plus shared experts.

Legend: T tokens, D hidden, F ffn, E experts, K slots per token, N tokens routed to one expert.

This is the readable oracle, not the fast path: it groups tokens by expert on the host
(nonzero and split sizes are host syncs on GPU), which the Triton path avoids.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moescope.kernels.config import MoEConfig
from moescope.kernels.routing import Routing


def swiglu(x_ND: Tensor, w_gate_DF: Tensor, w_up_DF: Tensor, w_down_FD: Tensor) -> Tensor:
    return (F.silu(x_ND @ w_gate_DF) * (x_ND @ w_up_DF)) @ w_down_FD


def experts_forward(x_TD: Tensor, routing: Routing, params, cfg: MoEConfig) -> Tensor:
    """y_TD = sum over computed slots of weight * expert(x) + shared experts(x).

    Dropped slots and empty (-1) slots contribute nothing; a fully dropped token gets only
    the shared experts (the model's residual carries it through).
    """
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a Routing, got {type(routing).__name__}")
    if x_TD.dim() != 2 or x_TD.shape[1] != params.w_gate_EDF.shape[1]:
        raise ValueError(f"x_TD must be (tokens, {params.w_gate_EDF.shape[1]}), got {tuple(x_TD.shape)}")
    if routing.expert_ids_TK.shape[0] != x_TD.shape[0]:
        raise ValueError(f"routing covers {routing.expert_ids_TK.shape[0]} tokens but x_TD has {x_TD.shape[0]}")
    has_shared = params.shared_w_gate_DF is not None
    if bool(cfg.num_shared_experts) != has_shared:
        raise ValueError(f"cfg.num_shared_experts={cfg.num_shared_experts} but params "
                         f"{'has' if has_shared else 'has no'} shared expert weights")
    E = params.w_gate_EDF.shape[0]
    ids_TK = routing.expert_ids_TK
    computed_TK = (ids_TK >= 0) & ~routing.dropped_TK
    # Group the computed (token, slot) pairs by expert with one stable sort, gather once, and
    # scatter-add once: index_select/index_add keep the backward cheap on CPU.
    tok_N, slot_N = torch.nonzero(computed_TK, as_tuple=True)
    expert_N = ids_TK[tok_N, slot_N]
    order_N = torch.sort(expert_N, stable=True).indices
    tok_N, slot_N, expert_N = tok_N[order_N], slot_N[order_N], expert_N[order_N]
    sizes = torch.zeros(E, dtype=torch.int64, device=x_TD.device).scatter_add_(
        0, expert_N, torch.ones_like(expert_N)).tolist()  # host sync: the reference path only
    x_ND = x_TD.index_select(0, tok_N)
    outs = [swiglu(x_nD, params.w_gate_EDF[e], params.w_up_EDF[e], params.w_down_EFD[e])
            for e, x_nD in enumerate(torch.split(x_ND, sizes)) if sizes[e]]
    y_TD = torch.zeros_like(x_TD)
    if outs:
        weights_N = routing.weights_TK[tok_N, slot_N].to(x_TD.dtype)
        y_TD = y_TD.index_add(0, tok_N, torch.cat(outs) * weights_N[:, None])
    if has_shared:
        y_TD = y_TD + swiglu(x_TD, params.shared_w_gate_DF, params.shared_w_up_DF, params.shared_w_down_FD)
    return y_TD
