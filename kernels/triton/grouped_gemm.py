"""Grouped row GEMM over expert-aligned padded rows: C[m] = A[m] @ B[tile_expert[m // BLOCK_M]].

Used for the down projection (A = h_MF, B = w_down_EFD) and, with B a transposed view,
for the data gradients of the backward pass (dh = dO @ w_down^T, dx = dgate @ w_gate^T).
B may have any strides, so transposes cost nothing. Torch reference:
`grouped_gemm_reference` below (and the down projection in
`moescope.kernels.experts.experts_forward`).

Legend: E experts, M padded rows, B M-tiles, K reduction size, N output columns.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import INDEX_DTYPES, check_same, check_tensor, dot_precision


@triton.jit
def _grouped_gemm_kernel(
    # pointers
    a_ptr, b_ptr, tile_expert_ptr, c_ptr,
    # sizes
    N, K,
    # strides
    stride_am, stride_ak,
    stride_be, stride_bk, stride_bn,
    stride_cm, stride_cn,
    # constexprs
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tile_expert_ptr + pid_b)
    if e < 0:  # tile past the end: rows stay zero
        return
    rows = (pid_b * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_ptr + e.to(tl.int64) * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=col_ok[None, :])


def grouped_gemm(
    a_MK: torch.Tensor,
    b_EKN: torch.Tensor,
    tile_expert_B: torch.Tensor,
    *,
    block_m: int,
    out_dtype: torch.dtype | None = None,
    block_n: int = 64,
    block_k: int = 32,
) -> torch.Tensor:
    """c_MN = a_MK @ b_EKN[expert of the row's tile]; rows of tiles with expert -1 are 0.

    a_MK must be contiguous; b_EKN may be any strided view (e.g. w.transpose(1, 2))."""
    check_tensor("a_MK", a_MK, ndim=2)
    check_tensor("b_EKN", b_EKN, ndim=3, contiguous=False)
    check_tensor("tile_expert_B", tile_expert_B, ndim=1, dtypes=INDEX_DTYPES)
    check_same("b_EKN", b_EKN, "a_MK", a_MK)
    M, K = a_MK.shape
    if b_EKN.shape[1] != K:
        raise ValueError(f"b_EKN reduction size {b_EKN.shape[1]} != a_MK columns {K}")
    if M != tile_expert_B.shape[0] * block_m:
        raise ValueError(f"a_MK has {M} rows, expected tile_expert_B.numel() * block_m = {tile_expert_B.shape[0] * block_m}")
    N = b_EKN.shape[2]
    c_MN = torch.zeros((M, N), device=a_MK.device, dtype=out_dtype or a_MK.dtype)
    if M == 0 or N == 0:
        return c_MN
    grid = (tile_expert_B.shape[0], triton.cdiv(N, block_n))
    _grouped_gemm_kernel[grid](
        a_MK, b_EKN, tile_expert_B, c_MN,
        N, K,
        a_MK.stride(0), a_MK.stride(1),
        b_EKN.stride(0), b_EKN.stride(1), b_EKN.stride(2),
        c_MN.stride(0), c_MN.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=dot_precision(a_MK.dtype),
    )
    return c_MN


def grouped_gemm_reference(a_MK, b_EKN, tile_expert_B, *, block_m):
    c_MN = torch.zeros((a_MK.shape[0], b_EKN.shape[2]), dtype=torch.float32, device=a_MK.device)
    for b, e in enumerate(tile_expert_B.tolist()):
        if e >= 0:
            c_MN[b * block_m:(b + 1) * block_m] = a_MK[b * block_m:(b + 1) * block_m].float() @ b_EKN[e].float()
    return c_MN
