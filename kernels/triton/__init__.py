"""Triton backend of the reference MoE layer: a fused router with built-in statistics and
grouped SwiGLU expert GEMMs with a deterministic combine, forward and backward.

    routing = route_triton(x_TD, params, cfg)            # same contract as routing.route
    y_TD = experts_triton(x_TD, routing, params, cfg)    # same contract as experts.experts_forward

On a machine without a CUDA device the kernels run only under TRITON_INTERPRET=1 (set
before this package is imported); `HAS_TRITON_GPU` says which case applies.

Legend: T tokens, D hidden, F ffn, E experts, K slots per token.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from moescope.kernels.config import MoEConfig
from moescope.kernels.routing import Routing, capacity, check_inputs, expert_choice

from .align import build_plan, queue_positions
from .autograd import experts_function, router_function


def _detect_triton_gpu() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import triton.runtime.driver as driver

        return driver.active.get_current_target().backend in ("cuda", "hip")
    except Exception:  # no usable driver: the interpreter (or torch) is the only path
        return False


HAS_TRITON_GPU: bool = _detect_triton_gpu()
INTERPRETED: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

__all__ = ["HAS_TRITON_GPU", "INTERPRETED", "route_triton", "experts_triton", "block_m_for"]


def _check_runnable(t: Tensor, name: str) -> None:
    if t.is_cuda and not HAS_TRITON_GPU:
        raise ValueError(f"{name} is on {t.device} but Triton cannot target this GPU")
    if not t.is_cuda and not INTERPRETED:
        raise ValueError(f"{name} is on {t.device}: Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 "
                         f"set before importing moescope.kernels.triton")


def route_triton(x_TD: Tensor, params, cfg: MoEConfig, *, valid_T: Tensor | None = None) -> Routing:
    """Router logits in torch (float32 GEMM), then the fused Triton router kernel.

    Token choice: selection, gate weights and all statistics come from the kernel; queue
    positions for the capacity rule come from a stable torch sort of the slot-major
    assignments (deterministic). Expert choice: the kernel gives scores and statistics,
    the per-expert top-C selection is torch.topk over the transposed scores."""
    check_inputs(x_TD, params, cfg, valid_T)
    _check_runnable(x_TD, "x_TD")
    E, k = cfg.num_experts, cfg.top_k
    T = x_TD.shape[0]
    bias_E = params.router_bias_E.detach().float().contiguous()
    logits_TE = x_TD.float() @ params.router_weight_ED.float().T
    token_choice = cfg.routing == "token_choice"
    sigmoid = cfg.score == "sigmoid"
    (probs_TE, weights_TK, lse_T, prob_sum_E, expert_ids_TK, entropy_T, margin_T,
     tokens_per_expert_E, top1_per_expert_E) = router_function(
        logits_TE, bias_E, valid_T, top_k=k if token_choice else 0, sigmoid=sigmoid, normalize=cfg.normalize_topk)
    real_T = torch.ones(T, dtype=torch.bool, device=x_TD.device) if valid_T is None else valid_T.to(torch.bool)
    n_real = real_T.sum()

    if token_choice:
        dropped_TK = torch.zeros_like(expert_ids_TK, dtype=torch.bool)
        if cfg.capacity_factor is not None:
            queue_ids_TK = torch.where(real_T[:, None], expert_ids_TK, torch.full_like(expert_ids_TK, -1))
            pos_TK = queue_positions(queue_ids_TK, E)
            dropped_TK = (pos_TK >= capacity(n_real, k, E, cfg.capacity_factor)) & real_T[:, None]
    else:
        scores_TE = torch.sigmoid(logits_TE) if sigmoid else probs_TE
        expert_ids_TK, weights_TK = expert_choice(scores_TE, scores_TE.detach() + bias_E, real_T, n_real, cfg)
        dropped_TK = torch.zeros_like(expert_ids_TK, dtype=torch.bool)
        live_TK = (expert_ids_TK >= 0) & real_T[:, None]
        safe_TK = expert_ids_TK.clamp(min=0)
        zeros_E = torch.zeros(E, dtype=torch.int64, device=x_TD.device)
        tokens_per_expert_E = zeros_E.clone().scatter_add_(0, safe_TK.reshape(-1), live_TK.reshape(-1).long())
        top1_per_expert_E = zeros_E.clone().scatter_add_(0, safe_TK[:, 0], live_TK[:, 0].long())
    with torch.no_grad():
        live_TK = (expert_ids_TK >= 0) & real_T[:, None]
        dropped_per_expert_E = torch.zeros(E, dtype=torch.int64, device=x_TD.device).scatter_add_(
            0, expert_ids_TK.clamp(min=0).reshape(-1), (live_TK & dropped_TK).reshape(-1).long())

    denom = n_real.clamp(min=1).to(torch.float32)
    f_E = top1_per_expert_E.to(torch.float32) / denom
    aux_loss = cfg.aux_loss_coef * E * (f_E * (prob_sum_E / denom)).sum()
    z_loss = cfg.z_loss_coef * (lse_T.square() * real_T.to(torch.float32)).sum() / denom
    return Routing(
        logits_TE=logits_TE, probs_TE=probs_TE, expert_ids_TK=expert_ids_TK, weights_TK=weights_TK,
        dropped_TK=dropped_TK, entropy_T=entropy_T, logsumexp_T=lse_T.detach(), margin_T=margin_T,
        tokens_per_expert_E=tokens_per_expert_E, dropped_per_expert_E=dropped_per_expert_E,
        top1_per_expert_E=top1_per_expert_E, prob_sum_E=prob_sum_E.detach(), aux_loss=aux_loss, z_loss=z_loss)


def block_m_for(num_assignments: int, num_experts: int) -> int:
    """Rows per M-tile: small tiles when experts see few rows (decode), 64 otherwise."""
    rows_per_expert = num_assignments / max(num_experts, 1)
    return 16 if rows_per_expert <= 16 else 32 if rows_per_expert <= 64 else 64


def experts_triton(x_TD: Tensor, routing: Routing, params, cfg: MoEConfig) -> Tensor:
    """y_TD = sum over computed slots of gate weight * SwiGLU expert(x) + shared experts(x).

    Differentiable w.r.t. x_TD, the expert weights and routing.weights_TK. The shared
    experts are one dense SwiGLU in torch."""
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a Routing, got {type(routing).__name__}")
    if not isinstance(cfg, MoEConfig):
        raise TypeError(f"cfg must be a MoEConfig, got {type(cfg).__name__}")
    if not isinstance(x_TD, Tensor) or x_TD.dim() != 2:
        raise ValueError(f"x_TD must be a 2-D tensor (tokens, hidden), got {getattr(x_TD, 'shape', type(x_TD))}")
    if x_TD.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x_TD has unsupported dtype {x_TD.dtype}; expected float32, float16 or bfloat16")
    if not x_TD.is_contiguous():
        raise ValueError("x_TD must be contiguous (call .contiguous() first)")
    E, D, F = params.w_gate_EDF.shape
    if x_TD.shape[1] != D:
        raise ValueError(f"x_TD must be (tokens, {D}), got {tuple(x_TD.shape)}")
    if params.w_up_EDF.shape != (E, D, F) or params.w_down_EFD.shape != (E, F, D):
        raise ValueError(f"w_up_EDF {tuple(params.w_up_EDF.shape)} / w_down_EFD {tuple(params.w_down_EFD.shape)} "
                         f"do not match w_gate_EDF {(E, D, F)}")
    for name in ("w_gate_EDF", "w_up_EDF", "w_down_EFD"):
        if getattr(params, name).dtype != x_TD.dtype:
            raise TypeError(f"params.{name} has dtype {getattr(params, name).dtype} but x_TD has {x_TD.dtype}")
    if E != cfg.num_experts:
        raise ValueError(f"params has {E} experts but cfg.num_experts={cfg.num_experts}")
    ids_TK = routing.expert_ids_TK
    if ids_TK.dim() != 2 or ids_TK.shape[0] != x_TD.shape[0]:
        raise ValueError(f"routing covers {ids_TK.shape[0]} tokens but x_TD has {x_TD.shape[0]}")
    if routing.weights_TK.shape != ids_TK.shape or routing.dropped_TK.shape != ids_TK.shape:
        raise ValueError("routing.weights_TK / dropped_TK must have the shape of expert_ids_TK")
    has_shared = params.shared_w_gate_DF is not None
    if bool(cfg.num_shared_experts) != has_shared:
        raise ValueError(f"cfg.num_shared_experts={cfg.num_shared_experts} but params "
                         f"{'has' if has_shared else 'has no'} shared expert weights")
    _check_runnable(x_TD, "x_TD")

    T, K = ids_TK.shape
    plan = build_plan(ids_TK, routing.dropped_TK, E, block_m_for(T * K, E))
    # gate weights are applied in x's dtype, as the reference does
    y_TD = experts_function(x_TD, routing.weights_TK.to(x_TD.dtype), params.w_gate_EDF, params.w_up_EDF,
                            params.w_down_EFD, plan)
    if has_shared:
        from moescope.kernels.experts import swiglu

        y_TD = y_TD + swiglu(x_TD, params.shared_w_gate_DF, params.shared_w_up_DF, params.shared_w_down_FD)
    return y_TD
