"""Weighted combine of expert rows back into token order:
    y[t] = sum_k w[t, k] * o[row_of[t, k]]     (slots with row -1, i.e. dropped, skipped)

A gather per token rather than a scatter-add, so it is deterministic and atomic-free.
Without weights it sums the rows (the dx scatter of the backward pass). Torch
reference: `combine_reference` below (and the index_add in
`moescope.kernels.experts.experts_forward`).

Legend: T tokens, D hidden, K slots, M padded rows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import INDEX_DTYPES, check_tensor


@triton.jit
def _combine_kernel(
    # pointers
    o_ptr, row_of_ptr, w_ptr, y_ptr,
    # sizes
    T, D, K,
    # strides
    stride_om, stride_od,
    stride_rt, stride_rk,
    stride_wt, stride_wk,
    stride_yt, stride_yd,
    # constexprs
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, HAS_WEIGHT: tl.constexpr,
):
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = toks < T
    d_ok = ds < D
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for k in range(0, K):
        row = tl.load(row_of_ptr + toks * stride_rt + k * stride_rk, mask=t_ok, other=-1)
        r_ok = row >= 0
        o = tl.load(o_ptr + tl.where(r_ok, row, 0).to(tl.int64)[:, None] * stride_om + ds[None, :] * stride_od,
                    mask=r_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            w = tl.load(w_ptr + toks * stride_wt + k * stride_wk, mask=r_ok, other=0.0).to(tl.float32)
            o = o * w[:, None]
        acc += o
    tl.store(y_ptr + toks[:, None].to(tl.int64) * stride_yt + ds[None, :] * stride_yd,
             acc.to(y_ptr.dtype.element_ty), mask=t_ok[:, None] & d_ok[None, :])


def combine(
    o_MD: torch.Tensor,
    row_of_TK: torch.Tensor,
    weights_TK: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype | None = None,
    block_t: int = 16,
    block_d: int = 64,
) -> torch.Tensor:
    """y_TD[t] = sum_k weights_TK[t, k] * o_MD[row_of_TK[t, k]] (weights default to 1)."""
    check_tensor("o_MD", o_MD, ndim=2)
    check_tensor("row_of_TK", row_of_TK, ndim=2, dtypes=INDEX_DTYPES)
    if weights_TK is not None:
        check_tensor("weights_TK", weights_TK, ndim=2, contiguous=False)
        if weights_TK.shape != row_of_TK.shape:
            raise ValueError(f"weights_TK shape {tuple(weights_TK.shape)} != row_of_TK shape {tuple(row_of_TK.shape)}")
    T, K = row_of_TK.shape
    D = o_MD.shape[1]
    y_TD = torch.empty((T, D), device=o_MD.device, dtype=out_dtype or o_MD.dtype)
    if T == 0 or D == 0:
        return y_TD
    w = weights_TK if weights_TK is not None else row_of_TK  # placeholder pointer, never read
    grid = (triton.cdiv(T, block_t), triton.cdiv(D, block_d))
    _combine_kernel[grid](
        o_MD, row_of_TK, w, y_TD,
        T, D, K,
        o_MD.stride(0), o_MD.stride(1),
        row_of_TK.stride(0), row_of_TK.stride(1),
        w.stride(0), w.stride(1),
        y_TD.stride(0), y_TD.stride(1),
        BLOCK_T=block_t, BLOCK_D=block_d, HAS_WEIGHT=weights_TK is not None,
    )
    return y_TD


def combine_reference(o_MD, row_of_TK, weights_TK=None):
    T, K = row_of_TK.shape
    y = torch.zeros((T, o_MD.shape[1]), dtype=torch.float32, device=o_MD.device)
    for k in range(K):
        r = row_of_TK[:, k].long()
        ok = r >= 0
        w = weights_TK[:, k].float() if weights_TK is not None else torch.ones(T, device=o_MD.device)
        y[ok] += w[ok, None] * o_MD[r[ok]].float()
    return y
