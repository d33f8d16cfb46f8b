"""Device side of the probe: per-call statistics and exact per-expert counts, no host sync.

Legend: T tokens of one router call, E experts, K slots per token.

Everything here runs inside forward. Only device ops with shapes known in advance:
no .item(), .cpu(), .tolist(), bincount or nonzero, and no branch on tensor values.
Padding is excluded from the counts by multiplying with the mask, not by filtering.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moescope.probe.adapters.base import RouterCapture, RouterSite

# Rows of the per-site aggregate buffer (float64, exact for counts below 2**53).
AGG_TOKENS, AGG_DROPPED, AGG_WEIGHT, AGG_TOP1, AGG_PROB, AGG_NUM_TOKENS = range(6)
AGG_ROWS = 6


@dataclass
class CallTensors:
    """Per-token results of one router call (device tensors until copied)."""

    expert_ids_TK: torch.Tensor        # int16
    weights_TK: torch.Tensor           # float32
    stats_T3: torch.Tensor             # float32: entropy, logsumexp (NaN when no logits), margin
    dropped_TK: torch.Tensor | None    # bool, None when the family never drops

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.expert_ids_TK, self.weights_TK, self.stats_T3, self.dropped_TK) if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


@dataclass
class SiteState:
    """One hooked router: its preallocated aggregate buffer and this forward's calls."""

    index: int
    site: RouterSite
    agg_6E: torch.Tensor | None = None
    used_in_forward: bool = False
    calls: list[CallTensors] = field(default_factory=list)
    copy_event: object = None          # CUDA event of the last host copy of agg_6E

    def begin(self, device: torch.device) -> torch.Tensor:
        """Zero the aggregate buffer at this forward's first call to the site."""
        if self.agg_6E is None or self.agg_6E.device != device:
            self.agg_6E = torch.zeros(AGG_ROWS, self.site.num_experts, dtype=torch.float64, device=device)
        elif not self.used_in_forward:
            if self.copy_event is not None:
                # The previous forward's host copy must finish reading before we zero (device-side wait).
                torch.cuda.current_stream(device).wait_event(self.copy_event)
            self.agg_6E.zero_()
        self.used_in_forward = True
        return self.agg_6E


@torch.no_grad()
def accumulate(agg_6E: torch.Tensor, cap: RouterCapture, valid_T: torch.Tensor | None, per_token: bool) -> CallTensors | None:
    """Add one call's exact counts into agg_6E; return its per-token tensors when asked."""
    probs_TE = cap.probs_TE.detach()
    ids_TK = cap.expert_ids_TK.detach()
    if ids_TK.dim() == 1:
        ids_TK = ids_TK.unsqueeze(1)
    tokens, slots = ids_TK.shape
    num_experts = agg_6E.shape[1]
    device = agg_6E.device
    if valid_T is not None and valid_T.numel() != tokens:
        valid_T = None  # the router saw a different token set than the input (shape check, not data)
    if valid_T is not None:
        valid_T = valid_T.to(device, non_blocking=True)
    live_TK = (ids_TK >= 0).to(torch.float64)
    if valid_T is not None:
        live_TK = live_TK * valid_T[:, None]
    # Clamped so a misbehaving adapter cannot trigger a device-side assert that kills training.
    idx_TK = ids_TK.clamp(0, num_experts - 1).long()
    weights_TK = cap.weights_TK.detach().reshape(tokens, slots)
    dropped_TK = cap.dropped_TK.detach().reshape(tokens, slots) if cap.dropped_TK is not None else None
    dropped_live_TK = live_TK * dropped_TK.to(torch.float64) if dropped_TK is not None else torch.zeros_like(live_TK)
    src_3X = torch.stack([live_TK, dropped_live_TK, weights_TK.to(torch.float64) * live_TK]).reshape(3, -1)
    agg_6E[AGG_TOKENS:AGG_WEIGHT + 1].scatter_add_(1, idx_TK.reshape(1, -1).expand(3, -1), src_3X)
    agg_6E[AGG_TOP1].scatter_add_(0, idx_TK[:, 0], live_TK[:, 0])
    probs64_TE = probs_TE.to(torch.float64)
    if valid_T is not None:
        agg_6E[AGG_PROB].add_(valid_T @ probs64_TE)
        agg_6E[AGG_NUM_TOKENS].add_(valid_T.sum())
    else:
        agg_6E[AGG_PROB].add_(probs64_TE.sum(0))
        agg_6E[AGG_NUM_TOKENS].add_(float(tokens))
    if not per_token:
        return None
    probs32_TE = probs_TE.to(torch.float32)
    entropy_T = torch.special.entr(probs32_TE).sum(-1)
    if cap.logits_TE is not None:
        # Written out: torch's CPU logsumexp is ~100x slower than this for small E.
        logits32_TE = cap.logits_TE.detach().to(torch.float32)
        max_T = logits32_TE.amax(-1)
        lse_T = max_T + (logits32_TE - max_T[:, None]).exp().sum(-1).log()
    else:
        lse_T = torch.full_like(entropy_T, float("nan"))
    if probs32_TE.shape[-1] >= 2:
        top2_T2 = probs32_TE.topk(2, dim=-1).values
        margin_T = top2_T2[:, 0] - top2_T2[:, 1]
    else:
        margin_T = probs32_TE[:, 0]
    return CallTensors(
        expert_ids_TK=ids_TK.to(torch.int16),
        weights_TK=weights_TK.to(torch.float32),
        stats_T3=torch.stack([entropy_T, lse_T, margin_T], dim=1),
        dropped_TK=dropped_TK.to(torch.bool) if dropped_TK is not None else None,
    )


class HostCopier:
    """Copies device tensors into (pinned) host memory without blocking the host.

    On CUDA the copies run on a side stream that first waits for the compute stream,
    and one event marks completion; the background thread waits on it. On CPU the
    copy is a plain memcpy, which also detaches the snapshot from buffers reused later.
    """

    def __init__(self):
        self.pin = torch.cuda.is_available()
        self._streams: dict[torch.device, object] = {}

    def copy(self, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], object]:
        if not tensors:
            return [], None
        device = tensors[0].device
        if device.type != "cuda":
            return [t.clone() for t in tensors], None
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            hosts = []
            for t in tensors:
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pin)
                host.copy_(t, non_blocking=True)
                t.record_stream(stream)
                hosts.append(host)
            event = torch.cuda.Event()
            event.record(stream)
        return hosts, event
