"""Dispatch plan: sort kept (token, slot) assignments by expert and pad each expert's group
to a multiple of BLOCK_M so that every M-tile of the grouped GEMMs belongs to one expert.

Pure torch and free of host syncs: the number of tiles is bounded by
ceil(N / BLOCK_M) + E (N kept assignments), and tiles past the real ones carry expert -1
so the kernels return at once. The sort is stable over the slot-major flattening, which
is the same order the capacity rule uses, so queue positions fall out of it too.

Legend: T tokens, K top-k slots, E experts, N = K*T assignments, M padded rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DispatchPlan:
    row_token_M: torch.Tensor  # int32 token id of each padded row, -1 on padding
    row_assign_M: torch.Tensor  # int64 index into the flattened (T, K) assignments, -1 on padding
    row_of_TK: torch.Tensor  # int32 padded row of each (token, slot), -1 when dropped / unused
    tile_expert_B: torch.Tensor  # int32 expert of each M-tile, -1 for tiles past the end
    group_start_E: torch.Tensor  # int32 first padded row of each expert
    group_rows_E: torch.Tensor  # int32 kept rows of each expert (without padding)
    block_m: int

    @property
    def num_rows(self) -> int:
        return self.row_token_M.shape[0]


def queue_positions(expert_ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Position of each (token, slot) in its expert's queue, slot-major then token order.

    Unused slots (id -1) get position -1. Used for the capacity rule."""
    T, K = expert_ids_TK.shape
    ids_N = expert_ids_TK.t().reshape(-1)  # slot-major
    key_N = torch.where(ids_N >= 0, ids_N, torch.full_like(ids_N, num_experts))
    order_N = torch.argsort(key_N, stable=True)
    counts_E = torch.bincount(key_N, minlength=num_experts + 1)
    start_E = torch.cumsum(counts_E, 0) - counts_E
    rank_N = torch.arange(ids_N.numel(), device=ids_N.device) - start_E[key_N[order_N]]
    pos_N = torch.empty_like(ids_N)
    pos_N[order_N] = rank_N
    pos_N = torch.where(ids_N >= 0, pos_N, torch.full_like(pos_N, -1))
    return pos_N.view(K, T).t()


def build_plan(expert_ids_TK: torch.Tensor, dropped_TK: torch.Tensor, num_experts: int, block_m: int) -> DispatchPlan:
    """Group the kept assignments by expert (slot-major, token order within an expert)."""
    T, K = expert_ids_TK.shape
    E = num_experts
    dev = expert_ids_TK.device
    keep_TK = (expert_ids_TK >= 0) & ~dropped_TK
    # slot-major flattening so that, within an expert, slot 0 rows come first
    key_N = torch.where(keep_TK, expert_ids_TK, torch.full_like(expert_ids_TK, E)).t().reshape(-1)
    assign_N = torch.arange(T * K, device=dev).view(T, K).t().reshape(-1)  # index into (T, K) flattening
    order_N = torch.argsort(key_N, stable=True)
    counts_E = torch.bincount(key_N, minlength=E + 1)[:E]
    tiles_E = (counts_E + block_m - 1) // block_m
    start_E = torch.cumsum(counts_E, 0) - counts_E
    tile_end_E = torch.cumsum(tiles_E, 0)
    padded_start_E = (tile_end_E - tiles_E) * block_m

    max_tiles = (T * K + block_m - 1) // block_m + E
    M = max_tiles * block_m
    sorted_key_N = key_N[order_N]
    kept_N = sorted_key_N < E
    e_N = sorted_key_N.clamp(max=E - 1)
    dest_N = padded_start_E[e_N] + torch.arange(T * K, device=dev) - start_E[e_N]
    dest_N = torch.where(kept_N, dest_N, torch.full_like(dest_N, M))  # dropped -> dump row M

    row_assign_M = torch.full((M + 1,), -1, dtype=torch.int64, device=dev)
    row_assign_M[dest_N] = assign_N[order_N]
    row_assign_M = row_assign_M[:M]
    row_token_M = torch.where(row_assign_M >= 0, row_assign_M // K, row_assign_M).to(torch.int32)

    row_of_N = torch.full((T * K,), -1, dtype=torch.int64, device=dev)
    row_of_N[assign_N[order_N]] = torch.where(kept_N, dest_N, torch.full_like(dest_N, -1))
    tile_expert_B = torch.searchsorted(tile_end_E, torch.arange(max_tiles, device=dev), right=True)
    tile_expert_B = torch.where(tile_expert_B < E, tile_expert_B, torch.full_like(tile_expert_B, -1))
    return DispatchPlan(
        row_token_M=row_token_M.contiguous(),
        row_assign_M=row_assign_M.contiguous(),
        row_of_TK=row_of_N.view(T, K).to(torch.int32).contiguous(),
        tile_expert_B=tile_expert_B.to(torch.int32).contiguous(),
        group_start_E=padded_start_E.to(torch.int32).contiguous(),
        group_rows_E=counts_E.to(torch.int32).contiguous(),
        block_m=block_m,
    )
