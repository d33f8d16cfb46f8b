"""Typed response rows of the API, so the OpenAPI document names every column a page reads.

Metric rows are built from METRIC_COLUMNS (column -> type, description, as METRICS.md
defines them). Every column is optional: `by="step"` adds `step`, `by="window"` drops it,
and a float that is NaN (an empty group) travels as null.
"""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, create_model

_STEP = ("int", "training step (by=step only)")
_LAYER = ("int", "MoE layer index")
_EXPERT = ("int", "expert index within the layer")
_TOKENS = ("int", "tokens in the group")
_CKPT = ("str", "checkpoint name")

METRIC_COLUMNS: dict[str, dict[str, tuple[str, str]]] = {
    "load_share": {"step": _STEP, "layer": _LAYER, "expert": _EXPERT, "load": ("float", "(token, slot) assignments"),
                   "share": ("float", "load share f_i"), "uniform": ("float", "1/E")},
    "switch_score": {"step": _STEP, "layer": _LAYER, "switch_score": ("float", "E · Σ f_i · P_i; 1 = uniform"),
                     "tokens": _TOKENS},
    "maxvio": {"step": _STEP, "layer": _LAYER, "maxvio": ("float", "MaxVio of the step"),
               "maxvio_mean_layers": ("float", "MaxVio averaged over the selected layers at that step"),
               "maxvio_global": ("float", "MaxVio of the window's summed load (by=window)"),
               "maxvio_batch_mean": ("float", "mean of per-step MaxVio (by=window)"),
               "maxvio_global_mean_layers": ("float", "maxvio_global averaged over layers (by=window)"),
               "maxvio_batch_mean_layers": ("float", "maxvio_batch_mean averaged over layers (by=window)")},
    "cv": {"step": _STEP, "layer": _LAYER, "cv": ("float", "std / mean of expert load")},
    "utilisation": {"step": _STEP, "layer": _LAYER, "expert": _EXPERT, "load": ("float", "assignments"),
                    "tokens": _TOKENS, "utilisation": ("float", "load over the fair share T·k/E")},
    "dead_experts": {"step": _STEP, "layer": _LAYER, "num_experts": ("int", "E"), "dead": ("int", "experts with no load"),
                     "dead_fraction": ("float", "dead / E"), "starved": ("int", "experts under the threshold (dead included)"),
                     "starved_fraction": ("float", "starved / E"), "dead_ids": ("list[int]", "dead expert ids"),
                     "starved_ids": ("list[int]", "starved expert ids")},
    "drop_rate": {"step": _STEP, "layer": _LAYER, "bucket": ("int", "position bucket (position_buckets only)"),
                  "pos_lo": ("int", "first position of the bucket"), "pos_hi": ("int", "last position of the bucket"),
                  "slots": ("int", "all slots"), "dropped": ("int", "dropped slots"),
                  "drop_rate": ("float", "dropped / slots")},
    "predicted_drops": {"capacity_factor": ("float", "capacity factor c"), "step": _STEP, "layer": _LAYER,
                        "slots": ("int", "all slots"), "predicted_dropped": ("int", "slots beyond capacity ⌈T·k/E·c⌉"),
                        "predicted_drop_rate": ("float", "predicted_dropped / slots"),
                        "recorded_dropped": ("int", "slots the run really dropped")},
    "domain_specialisation": {"step": _STEP, "layer": _LAYER, "domain": ("str", "domain label"), "expert": _EXPERT,
                              "tokens": ("int", "tokens of the domain N_D"),
                              "routed": ("int", "domain tokens with the expert in top-k"),
                              "share": ("float", "routed / tokens"), "uniform": ("float", "k/E")},
    "vocab_specialisation": {"step": _STEP, "layer": _LAYER, "token_id": ("int", "input token id"),
                             "next_token_id": ("int", "following token id (next_token=true)"), "expert": _EXPERT,
                             "tokens": ("int", "occurrences N_x"), "routed": ("int", "occurrences routed to the expert"),
                             "share": ("float", "routed / tokens")},
    "coactivation": {"step": _STEP, "layer": _LAYER, "expert_i": _EXPERT, "expert_j": ("int", "the other expert"),
                     "both": ("int", "tokens with i and j in top-k"), "tokens_i": ("int", "tokens with i in top-k"),
                     "coactivation": ("float", "both / tokens_i")},
    "repetition": {"step": _STEP, "layer": _LAYER, "pairs": ("int", "adjacent token pairs"),
                   "top1_repeat": ("float", "share of pairs with the same top-1"),
                   "topk_overlap": ("float", "share of pairs whose top-k sets overlap"),
                   "top1_baseline": ("float", "random routing: 1/E"),
                   "topk_baseline": ("float", "random routing: 1 − C(E−k,k)/C(E,k)")},
    "entropy": {"step": _STEP, "layer": _LAYER, "tokens": _TOKENS, "mean": ("float", "mean entropy (nats)"),
                "p05": ("float", "5th percentile"), "p25": ("float", "25th percentile"), "p50": ("float", "median"),
                "p75": ("float", "75th percentile"), "p95": ("float", "95th percentile"),
                "uniform": ("float", "ln E, the entropy of uniform routing")},
    "z": {"step": _STEP, "layer": _LAYER, "tokens": _TOKENS, "mean": ("float", "z-loss: mean squared logsumexp"),
          "p05": ("float", "5th percentile"), "p25": ("float", "25th percentile"), "p50": ("float", "median"),
          "p75": ("float", "75th percentile"), "p95": ("float", "95th percentile")},
    "margin": {"step": _STEP, "layer": _LAYER, "tokens": _TOKENS, "mean": ("float", "mean top-1 minus top-2 probability"),
               "p05": ("float", "5th percentile"), "p25": ("float", "25th percentile"), "p50": ("float", "median"),
               "p75": ("float", "75th percentile"), "p95": ("float", "95th percentile")},
    "saturation": {"checkpoint": _CKPT, "step": ("int", "the checkpoint's step"), "layer": _LAYER, "tokens": _TOKENS,
                   "saturation": ("float", "mean |S(t) ∩ S(T)| / k against the reference"),
                   "baseline": ("float", "random routing: k/E")},
    "fluctuation": {"checkpoint": _CKPT, "step": ("int", "the checkpoint's step"), "layer": _LAYER, "tokens": _TOKENS,
                    "last_fluctuations": ("int", "tokens whose top-1 last changed here"),
                    "never": ("int", "tokens that always agreed with the reference"),
                    "cdf": ("float", "share of tokens settled at or before this checkpoint")},
    "load_js": {"layer": _LAYER, "checkpoint_a": _CKPT, "checkpoint_b": ("str", "the next checkpoint"),
                "js": ("float", "Jensen–Shannon divergence of expert load (nats, ≤ ln 2)")},
    "alignment": {"layer": _LAYER, "expert_a": ("int", "expert of model A"), "expert_b": ("int", "matched expert of model B"),
                  "co_assigned": ("int", "shared tokens top-1 routed to both"), "tokens_a": ("int", "tokens of expert_a"),
                  "tokens": ("int", "shared tokens"), "agreement": ("float", "share of tokens on matched experts"),
                  "baseline": ("float", "random routing: 1/E")},
}
_TYPES = {"int": Optional[int], "float": Optional[float], "str": Optional[str], "list[int]": Optional[list[int]]}


def _row_model(metric: str, columns: dict[str, tuple[str, str]]) -> type[BaseModel]:
    name = "".join(p.capitalize() for p in metric.split("_")) + "Row"
    fields: dict[str, Any] = {col: (_TYPES[kind], Field(None, description=desc)) for col, (kind, desc) in columns.items()}
    return create_model(name, __config__=ConfigDict(extra="allow"), **fields)


METRIC_ROWS: dict[str, type[BaseModel]] = {m: _row_model(m, cols) for m, cols in METRIC_COLUMNS.items()}


class RunSummary(BaseModel):
    run: str = Field(description="run id")
    created_at: Optional[float] = Field(None, description="when the run was first seen (Unix seconds)")
    checkpoints: int = Field(description="registered checkpoints")
    layers: int = Field(description="registered MoE layers")
    frames: int = Field(description="frames stored")
    routing_rows: int = Field(description="routing rows in live segments")
    last_write: Optional[float] = Field(None, description="newest stored frame (Unix seconds)")


class RunHealth(BaseModel):
    run: str = Field(description="run id")
    status: str = Field(description="recording (written in the last 2 minutes), idle, closed or empty")
    phase: str = Field(description="the phase the health is read from: train when the run trained, else all")
    last_step: Optional[int] = Field(None, description="newest step with expert load")
    window_steps: int = Field(description="the health window: this many steps up to last_step")
    maxvio: Optional[float] = Field(None, description="MaxVio of the window, averaged over layers")
    dead_experts: Optional[int] = Field(None, description="experts with no load in the window, summed over layers")
    experts: Optional[int] = Field(None, description="the experts dead_experts is out of: every layer's E, summed")
    drop_rate: Optional[float] = Field(None, description="dropped slots / all slots in the window")
    collapse: Optional[str] = Field(None, description="worst collapse verdict over the layers, with those layers "
                                                      "(null where collapse detection is not available)")
    collapse_layer: Optional[int] = Field(None, description="the first layer with that verdict (null when healthy)")
    alerts_firing: int = Field(description="alert rules firing on this run now")
    last_write: Optional[float] = Field(None, description="newest stored frame (Unix seconds)")
    routing_rows: int = Field(description="routing rows in live segments")


class Checkpoint(BaseModel):
    checkpoint: str = Field(description="checkpoint name")
    step: Optional[int] = Field(None, description="training step of the checkpoint")
    path: Optional[str] = Field(None, description="where the checkpoint file was registered")
    created_at: Optional[float] = Field(None, description="registration time (Unix seconds)")


class Layer(BaseModel):
    model_config = ConfigDict(extra="allow")
    run: Optional[str] = Field(None, description="run id")
    layer: int = Field(description="MoE layer index")
    module_path: Optional[str] = Field(None, description="the router module's path in the model")
    num_experts: Optional[int] = Field(None, description="E")
    top_k: Optional[int] = Field(None, description="k")
    router_kind: Optional[str] = Field(None, description="softmax-topk, sigmoid, expert-choice, …")
    capacity_factor: Optional[float] = Field(None, description="capacity factor, when the layer drops")


class LedgerRow(BaseModel):
    model_config = ConfigDict(extra="allow")
    producer: str = Field(description="probe producer id")
    sent: int = Field(description="frames the producer sent")
    stored: int = Field(description="frames stored")
    dead_lettered: int = Field(description="frames rejected to the dead-letter table")
    conflicts: Optional[int] = Field(None, description="frames that reused a (producer, seq) already stored")
    dropped: int = Field(description="frames the producer reported dropped")
    missing: int = Field(description="sequence numbers not accounted for")
    missing_seqs: list[int] = Field(description="the first 20 missing sequence numbers")
    closed: bool = Field(description="the producer sent its final frame")
