"""Grouped gate+up GEMM with the SwiGLU fused into the epilogue.

For every padded row m of expert e = tile_expert[m // BLOCK_M]:
    gate[m] = x[row_token[m]] @ w_gate[e],  up[m] = x[row_token[m]] @ w_up[e]
    h[m]    = silu(gate[m]) * up[m]
The token gather is fused into the A loads (no permuted copy of x); padding rows read
zeros. Torch reference: `moescope.kernels.experts.experts_forward` (first half of the
SwiGLU expert) and `grouped_swiglu_reference` below.

Legend: T tokens, D hidden, F ffn, E experts, M padded rows, B M-tiles.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import INDEX_DTYPES, check_same, check_tensor, dot_precision


@triton.jit
def _grouped_swiglu_kernel(
    # pointers
    x_ptr, w_gate_ptr, w_up_ptr, row_token_ptr, tile_expert_ptr, h_ptr, gate_ptr, up_ptr,
    # sizes
    D, F,
    # strides
    stride_xt, stride_xd,
    stride_we, stride_wd, stride_wf,
    stride_hm, stride_hf,
    # constexprs
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SAVE_PREACT: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tile_expert_ptr + pid_b)
    if e < 0:  # tile past the last expert's rows (grid is an upper bound, no host sync)
        return
    rows = pid_b * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = tl.load(row_token_ptr + rows)
    row_ok = tok >= 0
    tok = tl.where(row_ok, tok, 0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < F
    ks = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + tok[:, None] * stride_xt + ks[None, :] * stride_xd
    w_off = e.to(tl.int64) * stride_we + ks[:, None] * stride_wd + cols[None, :] * stride_wf
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_ok = (k0 + ks) < D
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wg = tl.load(w_gate_ptr + w_off, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        wu = tl.load(w_up_ptr + w_off, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc_g = tl.dot(a, wg, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, wu, acc_u, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xd
        w_off += BLOCK_K * stride_wd

    h = acc_g * tl.sigmoid(acc_g) * acc_u
    out_off = rows[:, None].to(tl.int64) * stride_hm + cols[None, :] * stride_hf
    mask = col_ok[None, :] & (rows[:, None] >= 0)
    tl.store(h_ptr + out_off, h.to(h_ptr.dtype.element_ty), mask=mask)
    if SAVE_PREACT:  # kept for the backward pass
        tl.store(gate_ptr + out_off, acc_g.to(gate_ptr.dtype.element_ty), mask=mask)
        tl.store(up_ptr + out_off, acc_u.to(up_ptr.dtype.element_ty), mask=mask)


def grouped_swiglu(
    x_TD: torch.Tensor,
    w_gate_EDF: torch.Tensor,
    w_up_EDF: torch.Tensor,
    row_token_M: torch.Tensor,
    tile_expert_B: torch.Tensor,
    *,
    block_m: int,
    save_preact: bool = False,
    block_n: int = 64,
    block_k: int = 32,
):
    """Returns h_MF (and gate_MF, up_MF when save_preact) in x's dtype; padding rows are 0."""
    check_tensor("x_TD", x_TD, ndim=2)
    check_tensor("w_gate_EDF", w_gate_EDF, ndim=3)
    check_tensor("w_up_EDF", w_up_EDF, ndim=3)
    check_tensor("row_token_M", row_token_M, ndim=1, dtypes=INDEX_DTYPES)
    check_tensor("tile_expert_B", tile_expert_B, ndim=1, dtypes=INDEX_DTYPES)
    check_same("w_gate_EDF", w_gate_EDF, "x_TD", x_TD)
    check_same("w_up_EDF", w_up_EDF, "x_TD", x_TD)
    if w_up_EDF.shape != w_gate_EDF.shape:
        raise ValueError(f"w_up_EDF shape {tuple(w_up_EDF.shape)} != w_gate_EDF shape {tuple(w_gate_EDF.shape)}")
    E, D, F = w_gate_EDF.shape
    if x_TD.shape[1] != D:
        raise ValueError(f"x_TD hidden size {x_TD.shape[1]} != w_gate_EDF hidden size {D}")
    M = row_token_M.shape[0]
    if M != tile_expert_B.shape[0] * block_m:
        raise ValueError(f"row_token_M has {M} rows, expected tile_expert_B.numel() * block_m = {tile_expert_B.shape[0] * block_m}")

    h_MF = torch.zeros((M, F), device=x_TD.device, dtype=x_TD.dtype)
    gate_MF = torch.zeros_like(h_MF) if save_preact else h_MF
    up_MF = torch.zeros_like(h_MF) if save_preact else h_MF
    if M == 0:
        return (h_MF, gate_MF, up_MF) if save_preact else h_MF
    grid = (tile_expert_B.shape[0], triton.cdiv(F, block_n))
    _grouped_swiglu_kernel[grid](
        x_TD, w_gate_EDF, w_up_EDF, row_token_M, tile_expert_B, h_MF, gate_MF, up_MF,
        D, F,
        x_TD.stride(0), x_TD.stride(1),
        w_gate_EDF.stride(0), w_gate_EDF.stride(1), w_gate_EDF.stride(2),
        h_MF.stride(0), h_MF.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        SAVE_PREACT=save_preact, PRECISION=dot_precision(x_TD.dtype),
    )
    return (h_MF, gate_MF, up_MF) if save_preact else h_MF


def grouped_swiglu_reference(x_TD, w_gate_EDF, w_up_EDF, row_token_M, tile_expert_B, *, block_m):
    """Per-tile torch loop with the same layout (used by the tests)."""
    M = row_token_M.shape[0]
    h_MF = torch.zeros((M, w_gate_EDF.shape[2]), dtype=torch.float32, device=x_TD.device)
    for b, e in enumerate(tile_expert_B.tolist()):
        if e < 0:
            continue
        tok = row_token_M[b * block_m:(b + 1) * block_m].long()
        xs = torch.where((tok >= 0)[:, None], x_TD[tok.clamp(min=0)].float(), 0.0)
        g = xs @ w_gate_EDF[e].float()
        h_MF[b * block_m:(b + 1) * block_m] = torch.nn.functional.silu(g) * (xs @ w_up_EDF[e].float())
    return h_MF
