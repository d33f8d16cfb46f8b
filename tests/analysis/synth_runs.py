"""Synthetic runs with known routing, written through Store.write_frame (shared by tests/analysis).

Legend: T tokens, E experts, K top-k. `make_layer_tables` turns one layer's routing
decisions (experts_TK, probs_TE, dropped_TK) into the three record tables, computing
expert_step exactly from every token as the probe does.
"""
from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from moescope.frame import Frame
from moescope.schema import EXPERT_STEP, ROUTING, TOKEN_STATS

SEQS, POSITIONS = 4, 32
T = SEQS * POSITIONS
DOMAINS = ["code", "code", "text", "text"]  # per sequence


@dataclass
class LayerStep:
    """One layer's routing of the T tokens of one step."""

    layer: int
    experts_TK: np.ndarray
    probs_TE: np.ndarray
    dropped_TK: np.ndarray
    logits_TE: np.ndarray | None = None


@dataclass
class StepData:
    step: int
    checkpoint: str
    token_ids_T: np.ndarray
    layers: list[LayerStep] = field(default_factory=list)
    probe_set: str | None = None  # rows of a probe-set replay


def token_columns(run: str, s: StepData) -> dict:
    seq_T = np.repeat(np.arange(SEQS, dtype=np.int32), POSITIONS)
    pos_T = np.tile(np.arange(POSITIONS, dtype=np.int32), SEQS)
    return {"run": [run] * T, "checkpoint": [s.checkpoint] * T, "step": np.full(T, s.step, np.int64),
            "rank": np.zeros(T, np.int32), "microbatch": np.zeros(T, np.int32), "seq": seq_T, "pos": pos_T,
            "token_id": s.token_ids_T.astype(np.int32), "domain": [DOMAINS[q] for q in seq_T], "phase": ["train"] * T,
            "probe_set": [s.probe_set] * T}


def make_layer_tables(run: str, s: StepData, ls: LayerStep, routing_rows: np.ndarray | None = None) -> dict[str, pa.Table]:
    """Tables for one layer; routing_rows (token indices) samples the per-token tables, expert_step stays exact."""
    tok = token_columns(run, s)
    k = ls.experts_TK.shape[1]
    e = ls.probs_TE.shape[1]
    keep_T = np.arange(T) if routing_rows is None else np.asarray(routing_rows)
    t_idx, slot = np.meshgrid(keep_T, np.arange(k), indexing="ij")
    t_idx, slot = t_idx.ravel(), slot.ravel()
    routing = {c: (np.asarray(v)[t_idx] if not isinstance(v, list) else [v[i] for i in t_idx]) for c, v in tok.items()}
    routing.update(layer=np.full(t_idx.size, ls.layer, np.int16), slot=slot.astype(np.int8),
                   expert=ls.experts_TK[t_idx, slot].astype(np.int16),
                   weight=ls.probs_TE[t_idx, ls.experts_TK[t_idx, slot]].astype(np.float32),
                   dropped=ls.dropped_TK[t_idx, slot])
    p = np.clip(ls.probs_TE, 1e-30, 1)
    entropy_T = -(ls.probs_TE * np.log(p)).sum(1)
    top2_T2 = -np.sort(-ls.probs_TE, axis=1)[:, :2]
    lse_T = (np.log(np.exp(ls.logits_TE).sum(1)) if ls.logits_TE is not None else np.full(T, np.nan))
    stats = {c: (np.asarray(v)[keep_T] if not isinstance(v, list) else [v[i] for i in keep_T]) for c, v in tok.items()}
    stats.update(layer=np.full(keep_T.size, ls.layer, np.int16), entropy=entropy_T[keep_T].astype(np.float32),
                 logsumexp=pa.array(lse_T[keep_T].astype(np.float32), mask=np.isnan(lse_T[keep_T])),
                 margin=(top2_T2[:, 0] - top2_T2[:, 1])[keep_T].astype(np.float32))
    load_E = np.bincount(ls.experts_TK.ravel(), minlength=e)
    drop_E = np.bincount(ls.experts_TK.ravel(), weights=ls.dropped_TK.ravel(), minlength=e)
    top1_E = np.bincount(ls.experts_TK[:, 0], minlength=e)
    weight_E = np.bincount(ls.experts_TK.ravel(), weights=ls.probs_TE[np.arange(T)[:, None], ls.experts_TK].ravel(),
                           minlength=e)
    expert_step = {"run": [run] * e, "checkpoint": [s.checkpoint] * e, "step": [s.step] * e, "rank": [0] * e,
                   "layer": [ls.layer] * e, "expert": list(range(e)), "num_tokens": [T] * e, "tokens": load_E,
                   "dropped": drop_E.astype(np.int64), "top1": top1_E, "prob_sum": ls.probs_TE.sum(0),
                   "weight_sum": weight_E, "phase": ["train"] * e}
    return {"routing": pa.table(routing, schema=ROUTING), "token_stats": pa.table(stats, schema=TOKEN_STATS),
            "expert_step": pa.table(expert_step, schema=EXPERT_STEP)}


def write_run(store, run: str, steps: list[StepData], layer_sizes: dict[int, tuple[int, int]],
              routing_rows: np.ndarray | None = None, checkpoints: list[tuple[str, int]] = ()) -> None:
    """One frame per step holding every layer; layer_sizes {layer: (E, K)} registers the layers."""
    for seq, s in enumerate(steps):
        write_run_step(store, run, s, layer_sizes, seq, routing_rows, checkpoints)


def write_run_step(store, run: str, s: StepData, layer_sizes: dict[int, tuple[int, int]], seq: int,
                   routing_rows: np.ndarray | None = None, checkpoints: list[tuple[str, int]] = ()) -> None:
    """Frame `seq` of the run's producer: one step, every layer."""
    meta_layers = [{"layer": layer, "module_path": f"layers.{layer}.mlp", "num_experts": e, "top_k": k,
                    "router_kind": "softmax-topk", "capacity_factor": 1.0} for layer, (e, k) in layer_sizes.items()]
    parts = [make_layer_tables(run, s, ls, routing_rows) for ls in s.layers]
    tables = {name: pa.concat_tables([p[name] for p in parts]) for name in ("routing", "token_stats", "expert_step")}
    store.write_frame(Frame(run=run, producer=f"{run}-p", seq=seq, tables=tables, frame_id=uuid.uuid4().hex,
                            meta={"layers": meta_layers, "checkpoints": [{"checkpoint": c, "step": st} for c, st in checkpoints]}))


def softmax(x_TE: np.ndarray) -> np.ndarray:
    z = np.exp(x_TE - x_TE.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def capacity_drops(experts_TK: np.ndarray, e: int, factor: float, order_T: np.ndarray | None = None) -> np.ndarray:
    """Switch-style drops: in `order_T` (default token order), slots beyond capacity ceil(T·K/E·c) are dropped."""
    cap = int(np.ceil(experts_TK.size / e * factor))
    seen_E = np.zeros(e, int)
    dropped_TK = np.zeros(experts_TK.shape, bool)
    order_T = np.arange(experts_TK.shape[0]) if order_T is None else order_T
    for t, kk in itertools.product(order_T, range(experts_TK.shape[1])):
        x = experts_TK[t, kk]
        dropped_TK[t, kk] = seen_E[x] >= cap
        seen_E[x] += 1
    return dropped_TK


E = 8


def uniform_layer(layer: int) -> LayerStep:
    """Top-2 over 8 experts with every expert equally loaded and every router distribution uniform."""
    t = np.arange(T)
    experts_TK = np.stack([t % E, (t + 1) % E], 1)
    return LayerStep(layer, experts_TK, np.full((T, E), 1.0 / E), np.zeros((T, 2), bool), np.zeros((T, E)))


def collapsed_layer(layer: int) -> LayerStep:
    """Top-1: every token goes to expert 0 with probability ~1."""
    logits_TE = np.full((T, E), -20.0)
    logits_TE[:, 0] = 20.0
    return LayerStep(layer, np.zeros((T, 1), int), softmax(logits_TE), np.zeros((T, 1), bool), logits_TE)


def random_layer(layer: int, rng: np.random.Generator, capacity_factor: float = 1.0) -> LayerStep:
    """Top-2 softmax router over skewed random logits; code tokens lean to experts 0 and 1."""
    logits_TE = rng.normal(size=(T, E)) + np.linspace(1.0, 0.0, E)
    code_T = np.array([DOMAINS[q] == "code" for q in np.repeat(np.arange(SEQS), POSITIONS)])
    logits_TE[code_T, :2] += 1.5
    probs_TE = softmax(logits_TE)
    experts_TK = np.argsort(-probs_TE, axis=1)[:, :2]
    # Earlier positions claim capacity first, so later positions drop more (as in OpenMoE).
    by_position_T = np.argsort(np.tile(np.arange(POSITIONS), SEQS), kind="stable")
    return LayerStep(layer, experts_TK, probs_TE, capacity_drops(experts_TK, E, capacity_factor, by_position_T), logits_TE)


def synth_steps(seed: int = 1234) -> list[StepData]:
    """4 steps: layer 0 uniform (E=8, K=2), layer 1 collapsed (E=8, K=1), layer 2 random (E=8, K=2)."""
    rng = np.random.default_rng(seed)
    steps = []
    for step in range(4):
        s = StepData(step=step * 10, checkpoint="c0", token_ids_T=rng.integers(0, 6, T))
        s.layers = [uniform_layer(0), collapsed_layer(1), random_layer(2, rng)]
        steps.append(s)
    return steps
