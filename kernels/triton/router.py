"""Fused router kernel: one pass over the router logits does the scoring, top-k selection,
ordering by gate weight, renormalisation and every per-token / per-expert statistic the
probe reads (entropy, logsumexp, margin, assignment and top-1 counts, probability sums).

Per row t (token) of logits_TE (float32):
    scores = softmax(logits)                 | sigmoid(logits)
    probs  = scores                          | scores / sum(scores)
    chosen = top-k of scores + bias_E        (selection only; DeepSeek loss-free balancing)
    gates  = scores[chosen] (/ their sum when NORMALIZE), emitted largest first
Per-expert counts are reduced inside the program and added with one atomic per expert,
so the count of a launch does not depend on the order of the atomics (integers);
prob_sum_E is a float atomic sum (order-dependent in the last bits).
TOP_K = 0 computes only the scores and statistics (expert choice selects in torch).

Torch reference: `moescope.kernels.routing.route`.

Legend: T tokens, E experts, K top-k slots.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_tensor


@triton.jit
def _router_kernel(
    # pointers
    logits_ptr, bias_ptr, valid_ptr,
    probs_ptr, ids_ptr, weights_ptr, entropy_ptr, lse_ptr, margin_ptr,
    tokens_per_expert_ptr, top1_per_expert_ptr, prob_sum_ptr,
    # sizes
    T, E,
    # strides
    stride_lt, stride_le,
    stride_pt, stride_pe,
    stride_it, stride_ik,
    stride_wt, stride_wk,
    # constexprs
    TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    SIGMOID: tl.constexpr, NORMALIZE: tl.constexpr, HAS_VALID: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    r_ok = rows < T
    c_ok = cols < E
    rows64 = rows.to(tl.int64)
    mask = r_ok[:, None] & c_ok[None, :]
    # rows past T read 0 (not -inf) so no NaN appears; their results are masked out
    logits = tl.load(logits_ptr + rows64[:, None] * stride_lt + cols[None, :] * stride_le, mask=mask, other=0.0)
    logits = tl.where(c_ok[None, :], logits.to(tl.float32), float("-inf"))
    if HAS_VALID:
        real = (tl.load(valid_ptr + rows, mask=r_ok, other=0) != 0) & r_ok
    else:
        real = r_ok

    row_max = tl.max(logits, axis=1)
    ex = tl.exp(logits - row_max[:, None])  # exp(-inf) = 0 on padding columns
    ex_sum = tl.sum(ex, axis=1)
    lse = row_max + tl.log(ex_sum)
    if SIGMOID:
        scores = tl.where(c_ok[None, :], tl.sigmoid(logits), 0.0)
        probs = scores / tl.sum(scores, axis=1)[:, None]
    else:
        scores = ex / ex_sum[:, None]
        probs = scores
    # log of 1 where p == 0 keeps 0 * log 0 out of the sum (xlogy convention)
    entropy = -tl.sum(probs * tl.log(tl.where(probs > 0, probs, 1.0)), axis=1)
    # margin: top-1 minus top-2 prob; with E == 1 the second is a padding column (0)
    p1 = tl.max(probs, axis=1)
    i1 = tl.min(tl.where(probs == p1[:, None], cols[None, :], BLOCK_E), axis=1)
    p2 = tl.max(tl.where((cols[None, :] == i1[:, None]) | ~c_ok[None, :], -1.0, probs), axis=1)
    p2 = tl.maximum(p2, 0.0)

    tl.store(probs_ptr + rows64[:, None] * stride_pt + cols[None, :] * stride_pe, probs, mask=mask)
    tl.store(entropy_ptr + rows, entropy, mask=r_ok)
    tl.store(lse_ptr + rows, lse, mask=r_ok)
    tl.store(margin_ptr + rows, p1 - p2, mask=r_ok)
    tl.atomic_add(prob_sum_ptr + cols, tl.sum(tl.where(real[:, None], probs, 0.0), axis=0), mask=c_ok)

    if TOP_K > 0:
        bias = tl.load(bias_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
        select = tl.where(c_ok[None, :], scores + bias[None, :], float("-inf"))
        chosen = (rows[:, None] < 0) & (cols[None, :] < 0)  # all False, [BLOCK_T, BLOCK_E]
        for _k in tl.static_range(TOP_K):
            best = tl.max(select, axis=1)
            idx = tl.min(tl.where(select == best[:, None], cols[None, :], BLOCK_E), axis=1)
            hit = cols[None, :] == idx[:, None]
            chosen = chosen | hit
            select = tl.where(hit, float("-inf"), select)
        gates = tl.where(chosen, scores, 0.0)
        if NORMALIZE:
            gates = gates / tl.sum(gates, axis=1)[:, None]
        # emit slots by descending gate weight (the bias may have reordered the selection)
        key = tl.where(chosen, gates, -1.0)
        counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
        for k in tl.static_range(TOP_K):
            w = tl.max(key, axis=1)
            idx = tl.min(tl.where(key == w[:, None], cols[None, :], BLOCK_E), axis=1)
            hit = cols[None, :] == idx[:, None]
            key = tl.where(hit, -2.0, key)
            tl.store(ids_ptr + rows64 * stride_it + k * stride_ik, idx.to(tl.int64), mask=r_ok)
            tl.store(weights_ptr + rows64 * stride_wt + k * stride_wk, w, mask=r_ok)
            hit_count = tl.sum((hit & real[:, None]).to(tl.int32), axis=0)
            counts += hit_count
            if k == 0:
                tl.atomic_add(top1_per_expert_ptr + cols, hit_count, mask=c_ok)
        tl.atomic_add(tokens_per_expert_ptr + cols, counts, mask=c_ok)


def _block_sizes(E: int) -> tuple[int, int]:
    block_e = max(2, triton.next_power_of_2(E))  # >= 2 so the margin always sees a second column
    block_t = max(1, min(64, 4096 // block_e))
    return block_t, block_e


def router_topk(
    logits_TE: torch.Tensor,
    bias_E: torch.Tensor,
    *,
    top_k: int,
    sigmoid: bool = False,
    normalize: bool = True,
    valid_T: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Launch the fused router kernel. top_k = 0 skips selection (expert choice).

    Returns probs_TE, expert_ids_TK, weights_TK (float32), entropy_T, logsumexp_T, margin_T,
    tokens_per_expert_E, top1_per_expert_E (int64, real tokens only) and prob_sum_E."""
    check_tensor("logits_TE", logits_TE, ndim=2, dtypes=(torch.float32,))
    check_tensor("bias_E", bias_E, ndim=1, contiguous=False)
    T, E = logits_TE.shape
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
    if top_k > E:
        raise ValueError(f"top_k={top_k} exceeds the number of experts E={E}")
    if E == 0:
        raise ValueError("logits_TE must have at least one expert column")
    if bias_E.shape != (E,):
        raise ValueError(f"bias_E must have shape ({E},), got {tuple(bias_E.shape)}")
    if bias_E.device != logits_TE.device:
        raise ValueError(f"bias_E is on {bias_E.device} but logits_TE is on {logits_TE.device}")
    if valid_T is not None:
        if not isinstance(valid_T, torch.Tensor) or valid_T.shape != (T,):
            raise ValueError(f"valid_T must be a tensor of shape ({T},)")
        valid_T = valid_T.to(device=logits_TE.device, dtype=torch.int8).contiguous()
    dev = logits_TE.device
    out = {
        "probs_TE": torch.empty((T, E), device=dev, dtype=torch.float32),
        "expert_ids_TK": torch.empty((T, top_k), device=dev, dtype=torch.int64),
        "weights_TK": torch.empty((T, top_k), device=dev, dtype=torch.float32),
        "entropy_T": torch.empty(T, device=dev, dtype=torch.float32),
        "logsumexp_T": torch.empty(T, device=dev, dtype=torch.float32),
        "margin_T": torch.empty(T, device=dev, dtype=torch.float32),
        "tokens_per_expert_E": torch.zeros(E, device=dev, dtype=torch.int32),
        "top1_per_expert_E": torch.zeros(E, device=dev, dtype=torch.int32),
        "prob_sum_E": torch.zeros(E, device=dev, dtype=torch.float32),
    }
    if T > 0:
        block_t, block_e = _block_sizes(E)
        ids, w = out["expert_ids_TK"], out["weights_TK"]
        _router_kernel[(triton.cdiv(T, block_t),)](
            logits_TE, bias_E, valid_T if valid_T is not None else logits_TE,
            out["probs_TE"], ids, w, out["entropy_T"], out["logsumexp_T"], out["margin_T"],
            out["tokens_per_expert_E"], out["top1_per_expert_E"], out["prob_sum_E"],
            T, E,
            logits_TE.stride(0), logits_TE.stride(1),
            out["probs_TE"].stride(0), out["probs_TE"].stride(1),
            max(ids.stride(0), 1), max(ids.stride(1), 1) if top_k else 1,
            max(w.stride(0), 1), max(w.stride(1), 1) if top_k else 1,
            TOP_K=top_k, BLOCK_T=block_t, BLOCK_E=block_e,
            SIGMOID=bool(sigmoid), NORMALIZE=bool(normalize), HAS_VALID=valid_T is not None,
        )
    # int32 atomics are the portable kind; the Routing contract is int64
    out["tokens_per_expert_E"] = out["tokens_per_expert_E"].to(torch.int64)
    out["top1_per_expert_E"] = out["top1_per_expert_E"].to(torch.int64)
    return out
