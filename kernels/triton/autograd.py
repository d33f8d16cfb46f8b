"""torch.autograd.Functions that tie the Triton kernels into training.

_ExpertsFunction: forward = grouped SwiGLU GEMM -> grouped down GEMM -> weighted combine;
backward = Triton grouped GEMMs on transposed weight views for the data gradients,
Triton per-expert weight-gradient GEMMs for dW, the SwiGLU derivative and the gate-weight
gradient (a row-wise dot) in torch. Gradients flow to x, the three expert weight tensors
and the gate weights (hence to the router through `_RouterFunction`).

_RouterFunction: forward = the fused router kernel; backward in torch (T x E elementwise):
analytic gradients of probs_TE, weights_TK, logsumexp_T and prob_sum_E w.r.t. logits_TE.

Legend: T tokens, D hidden, F ffn, E experts, K slots, M padded rows.
"""
from __future__ import annotations

import torch

from .align import DispatchPlan
from .combine import combine
from .grouped_gemm import grouped_gemm
from .grouped_swiglu import grouped_swiglu
from .grouped_weight_grad import grouped_weight_grad


class _ExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, weights_TK, w_gate_EDF, w_up_EDF, w_down_EFD, plan: DispatchPlan, grad_mode: bool):
        # inside forward grad mode is always off, so the caller's mode travels as an argument;
        # without it inference would keep the gate/up pre-activations for nothing
        need_grad = grad_mode and any(ctx.needs_input_grad[:5])
        out = grouped_swiglu(x_TD, w_gate_EDF, w_up_EDF, plan.row_token_M, plan.tile_expert_B,
                             block_m=plan.block_m, save_preact=need_grad)
        h_MF, gate_MF, up_MF = out if need_grad else (out, None, None)
        o_MD = grouped_gemm(h_MF, w_down_EFD, plan.tile_expert_B, block_m=plan.block_m)
        y_TD = combine(o_MD, plan.row_of_TK, weights_TK, out_dtype=x_TD.dtype)
        if need_grad:
            ctx.save_for_backward(x_TD, weights_TK, w_gate_EDF, w_up_EDF, w_down_EFD, h_MF, gate_MF, up_MF, o_MD)
            ctx.plan = plan
        return y_TD

    @staticmethod
    def backward(ctx, dy_TD):
        x_TD, weights_TK, w_gate_EDF, w_up_EDF, w_down_EFD, h_MF, gate_MF, up_MF, o_MD = ctx.saved_tensors
        plan: DispatchPlan = ctx.plan
        T, K = weights_TK.shape
        dy_TD = dy_TD.contiguous()
        kept_M = plan.row_assign_M >= 0
        tok_M = plan.row_token_M.long().clamp(min=0)
        assign_M = plan.row_assign_M.clamp(min=0)

        # gate weights: d w[t, k] = <dy[t], o[row(t, k)]>, 0 for dropped slots
        dw_M = (dy_TD.float()[tok_M] * o_MD.float()).sum(-1) * kept_M
        d_weights_TK = torch.zeros(T * K, device=dy_TD.device, dtype=torch.float32)
        d_weights_TK.index_add_(0, assign_M, dw_M)
        d_weights_TK = d_weights_TK.view(T, K).to(weights_TK.dtype)

        # dO[m] = w[row] * dy[token(m)] (padding rows 0)
        w_M = weights_TK.reshape(-1)[assign_M].float() * kept_M
        d_o_MD = (dy_TD.float()[tok_M] * w_M[:, None]).to(x_TD.dtype)
        bm = plan.block_m
        dh_MF = grouped_gemm(d_o_MD, w_down_EFD.transpose(1, 2), plan.tile_expert_B, block_m=bm,
                             out_dtype=torch.float32)
        g = gate_MF.float()
        sig = torch.sigmoid(g)
        silu = g * sig
        d_up_MF = (dh_MF * silu).to(x_TD.dtype)
        d_gate_MF = (dh_MF * up_MF.float() * sig * (1 + g * (1 - sig))).to(x_TD.dtype)

        dw_down = dw_gate = dw_up = dx_TD = None
        if ctx.needs_input_grad[4]:
            dw_down = grouped_weight_grad(h_MF, d_o_MD, plan.group_start_E, plan.group_rows_E)
        if ctx.needs_input_grad[2]:
            dw_gate = grouped_weight_grad(x_TD, d_gate_MF, plan.group_start_E, plan.group_rows_E,
                                          row_token_M=plan.row_token_M)
        if ctx.needs_input_grad[3]:
            dw_up = grouped_weight_grad(x_TD, d_up_MF, plan.group_start_E, plan.group_rows_E,
                                        row_token_M=plan.row_token_M)
        if ctx.needs_input_grad[0]:
            dx_MD = grouped_gemm(d_gate_MF, w_gate_EDF.transpose(1, 2), plan.tile_expert_B, block_m=bm,
                                 out_dtype=torch.float32)
            dx_MD += grouped_gemm(d_up_MF, w_up_EDF.transpose(1, 2), plan.tile_expert_B, block_m=bm,
                                  out_dtype=torch.float32)
            dx_TD = combine(dx_MD, plan.row_of_TK, out_dtype=x_TD.dtype)  # sum over each token's slots
        return dx_TD, d_weights_TK, dw_gate, dw_up, dw_down, None, None


def experts_function(x_TD, weights_TK, w_gate_EDF, w_up_EDF, w_down_EFD, plan: DispatchPlan):
    return _ExpertsFunction.apply(x_TD, weights_TK, w_gate_EDF, w_up_EDF, w_down_EFD, plan, torch.is_grad_enabled())


class _RouterFunction(torch.autograd.Function):
    """Differentiable outputs: probs_TE, weights_TK, logsumexp_T, prob_sum_E (all w.r.t. logits_TE).

    The backward recomputes the T x E scoring in torch and differentiates it: the kernel
    holds no autograd graph, and these elementwise ops are cheap next to the expert GEMMs."""

    @staticmethod
    def forward(ctx, logits_TE, bias_E, valid_T, top_k, sigmoid, normalize):
        from .router import router_topk

        out = router_topk(logits_TE, bias_E, top_k=top_k, sigmoid=sigmoid, normalize=normalize, valid_T=valid_T)
        ctx.save_for_backward(logits_TE, out["expert_ids_TK"], valid_T if valid_T is not None else logits_TE[:0])
        ctx.has_valid, ctx.sigmoid, ctx.normalize = valid_T is not None, sigmoid, normalize
        ctx.mark_non_differentiable(out["expert_ids_TK"], out["entropy_T"], out["margin_T"],
                                    out["tokens_per_expert_E"], out["top1_per_expert_E"])
        return (out["probs_TE"], out["weights_TK"], out["logsumexp_T"], out["prob_sum_E"], out["expert_ids_TK"],
                out["entropy_T"], out["margin_T"], out["tokens_per_expert_E"], out["top1_per_expert_E"])

    @staticmethod
    def backward(ctx, d_probs_TE, d_weights_TK, d_lse_T, d_prob_sum_E, *_non_diff):
        logits_TE, ids_TK, valid_T = ctx.saved_tensors
        with torch.enable_grad():
            l_TE = logits_TE.detach().requires_grad_(True)
            if ctx.sigmoid:
                scores_TE = torch.sigmoid(l_TE)
                probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
            else:
                scores_TE = probs_TE = torch.softmax(l_TE, dim=-1)
            real_T = valid_T.to(torch.float32) if ctx.has_valid else torch.ones_like(l_TE[:, 0])
            outs = [probs_TE, torch.logsumexp(l_TE, dim=-1), (probs_TE * real_T[:, None]).sum(0)]
            grads = [d_probs_TE, d_lse_T, d_prob_sum_E]
            if ids_TK.shape[1] > 0:
                w_TK = scores_TE.gather(1, ids_TK)
                if ctx.normalize:
                    w_TK = w_TK / w_TK.sum(-1, keepdim=True)
                outs.append(w_TK)
                grads.append(d_weights_TK)
            pairs = [(o, g) for o, g in zip(outs, grads) if g is not None]
            if not pairs:
                return (None,) * 6
            (d_logits_TE,) = torch.autograd.grad([o for o, _ in pairs], [l_TE], [g for _, g in pairs])
        return d_logits_TE, None, None, None, None, None


def router_function(logits_TE, bias_E, valid_T, *, top_k: int, sigmoid: bool, normalize: bool):
    return _RouterFunction.apply(logits_TE, bias_E, valid_T, top_k, sigmoid, normalize)
