"""Per-expert weight gradient: dW[e] = A_e^T @ G_e, summed over the padded rows of expert e.

A's rows are either padded-row ordered (h_MF for dW_down) or gathered from the tokens
through row_token_M (x_TD for dW_gate / dW_up, no permuted copy of x). Each program owns
one (I, J) tile of one expert and walks that expert's rows, so the result is
deterministic (no atomics). Experts without rows get zeros. Torch reference:
`grouped_weight_grad_reference` below (autograd of the per-expert loop in
`moescope.kernels.experts.experts_forward`).

Legend: E experts, M padded rows, I rows of dW (A's columns), J columns of dW (G's columns).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import INDEX_DTYPES, check_same, check_tensor, dot_precision


@triton.jit
def _grouped_weight_grad_kernel(
    # pointers
    a_ptr, g_ptr, row_token_ptr, group_start_ptr, group_rows_ptr, dw_ptr,
    # sizes
    I, J,
    # strides
    stride_am, stride_ai,
    stride_gm, stride_gj,
    stride_we, stride_wi, stride_wj,
    # constexprs
    BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
    GATHER_A: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    e = tl.program_id(1)
    num_j = tl.cdiv(J, BLOCK_J)
    pid_i = pid // num_j
    pid_j = pid % num_j
    ii = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    jj = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    i_ok = ii < I
    j_ok = jj < J
    start = tl.load(group_start_ptr + e)
    n_rows = tl.load(group_rows_ptr + e)
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for m0 in range(0, n_rows, BLOCK_M):
        rows = start + m0 + tl.arange(0, BLOCK_M)
        r_ok = (m0 + tl.arange(0, BLOCK_M)) < n_rows
        if GATHER_A:
            a_rows = tl.load(row_token_ptr + rows, mask=r_ok, other=0)
            r_ok = r_ok & (a_rows >= 0)
            a_rows = tl.where(r_ok, a_rows, 0).to(tl.int64)
        else:
            a_rows = rows.to(tl.int64)
        # A^T tile loaded directly as [BLOCK_I, BLOCK_M]
        a_t = tl.load(a_ptr + a_rows[None, :] * stride_am + ii[:, None] * stride_ai,
                      mask=i_ok[:, None] & r_ok[None, :], other=0.0)
        g = tl.load(g_ptr + rows[:, None].to(tl.int64) * stride_gm + jj[None, :] * stride_gj,
                    mask=r_ok[:, None] & j_ok[None, :], other=0.0)
        acc = tl.dot(a_t, g, acc, input_precision=PRECISION)
    dw_ptrs = dw_ptr + e.to(tl.int64) * stride_we + ii[:, None] * stride_wi + jj[None, :] * stride_wj
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=i_ok[:, None] & j_ok[None, :])


def grouped_weight_grad(
    a: torch.Tensor,
    g_MJ: torch.Tensor,
    group_start_E: torch.Tensor,
    group_rows_E: torch.Tensor,
    *,
    row_token_M: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    block_m: int = 32,
    block_i: int = 32,
    block_j: int = 64,
) -> torch.Tensor:
    """dW_EIJ[e] = sum over expert e's rows m of a[row(m)]^T g[m].

    With row_token_M, a is x_TD and row(m) = row_token_M[m]; otherwise a is a_MI, row(m) = m."""
    check_tensor("a", a, ndim=2)
    check_tensor("g_MJ", g_MJ, ndim=2)
    check_tensor("group_start_E", group_start_E, ndim=1, dtypes=INDEX_DTYPES)
    check_tensor("group_rows_E", group_rows_E, ndim=1, dtypes=INDEX_DTYPES)
    check_same("g_MJ", g_MJ, "a", a)
    gather = row_token_M is not None
    if gather:
        check_tensor("row_token_M", row_token_M, ndim=1, dtypes=INDEX_DTYPES)
        if row_token_M.shape[0] != g_MJ.shape[0]:
            raise ValueError(f"row_token_M has {row_token_M.shape[0]} rows but g_MJ has {g_MJ.shape[0]}")
    elif a.shape[0] != g_MJ.shape[0]:
        raise ValueError(f"a has {a.shape[0]} rows but g_MJ has {g_MJ.shape[0]}")
    if group_start_E.shape != group_rows_E.shape:
        raise ValueError("group_start_E and group_rows_E must have the same shape")
    E = group_start_E.shape[0]
    I, J = a.shape[1], g_MJ.shape[1]
    dw_EIJ = torch.zeros((E, I, J), device=a.device, dtype=out_dtype or a.dtype)
    if E == 0 or I == 0 or J == 0:
        return dw_EIJ
    grid = (triton.cdiv(I, block_i) * triton.cdiv(J, block_j), E)
    _grouped_weight_grad_kernel[grid](
        a, g_MJ, row_token_M if gather else group_start_E, group_start_E, group_rows_E, dw_EIJ,
        I, J,
        a.stride(0), a.stride(1),
        g_MJ.stride(0), g_MJ.stride(1),
        dw_EIJ.stride(0), dw_EIJ.stride(1), dw_EIJ.stride(2),
        BLOCK_M=block_m, BLOCK_I=block_i, BLOCK_J=block_j,
        GATHER_A=gather, PRECISION=dot_precision(a.dtype),
    )
    return dw_EIJ


def grouped_weight_grad_reference(a, g_MJ, group_start_E, group_rows_E, *, row_token_M=None):
    E = group_start_E.shape[0]
    dw = torch.zeros((E, a.shape[1], g_MJ.shape[1]), dtype=torch.float32, device=a.device)
    for e in range(E):
        s, n = int(group_start_E[e]), int(group_rows_E[e])
        rows = torch.arange(s, s + n, device=a.device)
        a_rows = a[row_token_M[rows].long()] if row_token_M is not None else a[rows]
        dw[e] = a_rows.float().t() @ g_MJ[rows].float()
    return dw
