"""The reference router: scores, token-choice / expert-choice selection, capacity, statistics.

Legend: T tokens, D hidden, E experts, K slots per token (top_k; E under expert choice).

Capacity rule (token choice). C = ceil(T*k/E * capacity_factor), T = real (non-padding)
tokens. Each expert's queue is filled slot-major, then in token order: every slot-0
assignment first (token 0, 1, ...), then every slot-1 assignment, ... (GShard / Switch
priority: a token's first choice beats anyone's second). An assignment whose queue
position is >= C is dropped: it keeps its expert id and the gate weight it would have had,
but is not computed.

Expert choice. Each expert takes its top C = ceil(T*k/E * (capacity_factor or 1.0)) real
tokens by selection score; a token may get 0..E experts. K == E, slots are sorted by gate
weight, unused slots hold expert -1 and weight 0; nothing is ever dropped. Gate weights are
the raw scores (Zhou et al. 2022), `normalize_topk` does not apply.

Selection uses scores + router_bias_E (the loss-free balancing correction; zeros unless
updated), gate weights use the un-biased scores. Router arithmetic is float32 whatever the
input dtype. Everything is counted with scatter_add_ / cumsum on the device: no .item(),
no bincount, no data-dependent Python branch, so it runs without host sync and under
torch.compile(fullgraph=True).

`valid_T` (optional, bool) marks real tokens. Padding is excluded from capacity queues,
expert-choice selection, the counts and both losses, so padding never changes what happens
to real tokens; padding tokens still get (ignorable) expert ids.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from moescope.kernels.config import MoEConfig

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class Routing:
    """Everything the router decided, plus what observers need (the probe reads this)."""

    logits_TE: Tensor            # raw router logits, float32
    probs_TE: Tensor             # softmax, or sigmoid scores normalised per token
    expert_ids_TK: Tensor        # int64, slot 0 = largest gate weight, -1 = empty slot
    weights_TK: Tensor           # gate weight per slot; 0 where empty; kept for dropped slots
    dropped_TK: Tensor           # bool, capacity overflow (not computed)
    entropy_T: Tensor            # -sum p ln p over probs_TE, nats
    logsumexp_T: Tensor          # logsumexp of logits_TE
    margin_T: Tensor             # top-1 minus top-2 of probs_TE
    tokens_per_expert_E: Tensor  # int64 (token, slot) assignments incl. dropped, real tokens only
    dropped_per_expert_E: Tensor  # int64
    top1_per_expert_E: Tensor    # int64 tokens whose slot-0 expert is e (Switch f_i)
    prob_sum_E: Tensor           # float32 sum over real tokens of probs_TE (Switch P_i * T)
    aux_loss: Tensor             # scalar, already times aux_loss_coef
    z_loss: Tensor               # scalar, already times z_loss_coef


def check_inputs(x_TD: Tensor, params, cfg: MoEConfig, valid_T: Tensor | None = None) -> None:
    """Raise a one-line ValueError/TypeError naming the argument for any mis-shaped input."""
    if not isinstance(cfg, MoEConfig):
        raise TypeError(f"cfg must be a MoEConfig, got {type(cfg).__name__}")
    if not isinstance(x_TD, Tensor):
        raise TypeError(f"x_TD must be a torch.Tensor, got {type(x_TD).__name__}")
    if x_TD.dim() != 2:
        raise ValueError(f"x_TD must be 2-D (tokens, hidden), got shape {tuple(x_TD.shape)}")
    if x_TD.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x_TD dtype must be float32, float16 or bfloat16, got {x_TD.dtype}")
    w_ED = getattr(params, "router_weight_ED", None)
    if not isinstance(w_ED, Tensor) or not isinstance(getattr(params, "router_bias_E", None), Tensor):
        raise TypeError(f"params must be MoEParams or RouterParams, got {type(params).__name__}")
    if w_ED.shape[0] != cfg.num_experts:
        raise ValueError(f"params has {w_ED.shape[0]} experts but cfg.num_experts={cfg.num_experts}")
    if x_TD.shape[1] != w_ED.shape[1]:
        raise ValueError(f"x_TD hidden size {x_TD.shape[1]} does not match params hidden size {w_ED.shape[1]}")
    if valid_T is not None:
        if not isinstance(valid_T, Tensor) or valid_T.shape != (x_TD.shape[0],):
            raise ValueError(f"valid_T must be a tensor of shape ({x_TD.shape[0]},)")


def capacity(num_tokens, top_k: int, num_experts: int, capacity_factor: float):
    """C = ceil(T*k/E * c), in this exact float64 operation order (tensor or int T)."""
    if isinstance(num_tokens, Tensor):
        return torch.ceil(num_tokens.to(torch.float64) * top_k / num_experts * capacity_factor).to(torch.int64)
    return math.ceil(num_tokens * top_k / num_experts * capacity_factor)


def route(x_TD: Tensor, params, cfg: MoEConfig, *, valid_T: Tensor | None = None,
          logit_bias_E: Tensor | None = None) -> Routing:
    """The pure-torch oracle router. Reads only params.router_weight_ED and params.router_bias_E.

    logit_bias_E (optional, float32) is added to the logits before scoring: a planted
    router fault for collapse tests and benchmarks (zeros leave every output bit-identical).
    """
    check_inputs(x_TD, params, cfg, valid_T)
    T, E, k = x_TD.shape[0], cfg.num_experts, cfg.top_k
    logits_TE = x_TD.float() @ params.router_weight_ED.float().T
    if logit_bias_E is not None:
        logits_TE = logits_TE + logit_bias_E.float()
    if cfg.score == "softmax":
        scores_TE = torch.softmax(logits_TE, dim=-1)
        probs_TE = scores_TE
    else:
        scores_TE = torch.sigmoid(logits_TE)
        probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
    select_TE = scores_TE.detach() + params.router_bias_E.float()
    real_T = torch.ones(T, dtype=torch.bool, device=x_TD.device) if valid_T is None else valid_T.to(torch.bool)
    n_real = real_T.sum()

    if cfg.routing == "token_choice":
        expert_ids_TK, weights_TK, dropped_TK = _token_choice(scores_TE, select_TE, real_T, n_real, cfg)
    else:
        expert_ids_TK, weights_TK = expert_choice(scores_TE, select_TE, real_T, n_real, cfg)
        dropped_TK = torch.zeros_like(expert_ids_TK, dtype=torch.bool)

    with torch.no_grad():
        live_TK = (expert_ids_TK >= 0) & real_T[:, None]
        safe_ids_TK = expert_ids_TK.clamp(min=0)
        zeros_E = torch.zeros(E, dtype=torch.int64, device=x_TD.device)
        tokens_per_expert_E = zeros_E.clone().scatter_add_(0, safe_ids_TK.reshape(-1), live_TK.reshape(-1).long())
        dropped_per_expert_E = zeros_E.clone().scatter_add_(
            0, safe_ids_TK.reshape(-1), (live_TK & dropped_TK).reshape(-1).long())
        top1_per_expert_E = zeros_E.clone().scatter_add_(0, safe_ids_TK[:, 0], live_TK[:, 0].long())
        entropy_T = -torch.special.xlogy(probs_TE, probs_TE).sum(dim=-1)
        if E > 1:
            top2_T2 = probs_TE.topk(2, dim=-1).values
            margin_T = top2_T2[:, 0] - top2_T2[:, 1]
        else:
            margin_T = probs_TE[:, 0].clone()  # no second expert: margin against 0
    logsumexp_T = torch.logsumexp(logits_TE, dim=-1)

    # Switch loss: f_i = top-1 share (no gradient), P_i = mean router probability (gradient).
    realf_T = real_T.to(torch.float32)
    denom = n_real.clamp(min=1).to(torch.float32)
    prob_sum_E = (probs_TE * realf_T[:, None]).sum(dim=0)
    P_E = prob_sum_E / denom
    f_E = top1_per_expert_E.to(torch.float32) / denom
    aux_loss = cfg.aux_loss_coef * E * (f_E * P_E).sum()
    z_loss = cfg.z_loss_coef * (logsumexp_T.square() * realf_T).sum() / denom
    return Routing(
        logits_TE=logits_TE, probs_TE=probs_TE, expert_ids_TK=expert_ids_TK, weights_TK=weights_TK,
        dropped_TK=dropped_TK, entropy_T=entropy_T, logsumexp_T=logsumexp_T.detach(), margin_T=margin_T,
        tokens_per_expert_E=tokens_per_expert_E, dropped_per_expert_E=dropped_per_expert_E,
        top1_per_expert_E=top1_per_expert_E, prob_sum_E=prob_sum_E.detach(), aux_loss=aux_loss, z_loss=z_loss)


def _token_choice(scores_TE, select_TE, real_T, n_real, cfg):
    E, k = cfg.num_experts, cfg.top_k
    chosen_TK = select_TE.topk(k, dim=-1).indices
    weights_TK = scores_TE.gather(1, chosen_TK)
    if cfg.normalize_topk:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    # The bias can reorder selection vs weight; slot 0 must be the largest gate weight.
    order_TK = weights_TK.detach().sort(dim=-1, descending=True, stable=True).indices
    expert_ids_TK = chosen_TK.gather(1, order_TK)
    weights_TK = weights_TK.gather(1, order_TK)
    if cfg.capacity_factor is None:
        return expert_ids_TK, weights_TK, torch.zeros_like(expert_ids_TK, dtype=torch.bool)
    T = expert_ids_TK.shape[0]
    cap = capacity(n_real, k, E, cfg.capacity_factor)
    ids_KT = expert_ids_TK.T
    # Comparison, not F.one_hot: one_hot validates its input on the host (a sync) and is slow on CPU.
    experts_E = torch.arange(E, device=ids_KT.device)
    onehot_KTE = ((ids_KT[..., None] == experts_E) & real_T[None, :, None]).long()
    # Queue position of each assignment = how many earlier (slot-major, token order) went to that expert.
    pos_KTE = onehot_KTE.reshape(k * T, E).cumsum(dim=0).reshape(k, T, E) - 1
    pos_KT = pos_KTE.gather(2, ids_KT[..., None]).squeeze(-1)
    dropped_TK = (pos_KT.T >= cap) & real_T[:, None]
    return expert_ids_TK, weights_TK, dropped_TK


def expert_choice(scores_TE, select_TE, real_T, n_real, cfg):
    """Each expert keeps its top-C real tokens by selection score; slots sorted by raw score, -1 unused.

    Shared by the torch and Triton routers (the Triton kernel emits the scores).
    """
    T, E = scores_TE.shape
    factor = cfg.capacity_factor if cfg.capacity_factor is not None else 1.0
    c_max = min(T, capacity(T, cfg.top_k, E, factor))  # static shape; the real C (tensor) masks below
    cap = capacity(n_real, cfg.top_k, E, factor)
    select_ET = select_TE.T.masked_fill(~real_T[None, :], float("-inf"))
    tok_EC = select_ET.topk(c_max, dim=-1).indices
    rank_C = torch.arange(c_max, device=scores_TE.device)
    keep_EC = (rank_C[None, :] < cap) & real_T[tok_EC]
    chosen_TE = torch.zeros(E, T, dtype=torch.bool, device=scores_TE.device).scatter_(1, tok_EC, keep_EC).T
    key_TE = torch.where(chosen_TE, scores_TE.detach(), torch.full_like(scores_TE, -1.0))
    order_TE = key_TE.sort(dim=-1, descending=True, stable=True).indices
    used_TE = chosen_TE.gather(1, order_TE)
    expert_ids_TK = torch.where(used_TE, order_TE, torch.full_like(order_TE, -1))
    weights_TK = torch.where(used_TE, scores_TE.gather(1, order_TE), torch.zeros_like(scores_TE))
    return expert_ids_TK, weights_TK
