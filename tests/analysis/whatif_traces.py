"""Hand-built routing traces for the what-if tests, written through Store.write_frame.

A trace is {step: [(pos, experts), ...]}: one sequence per step, the token at `pos`
choosing `experts` in slot order. expert_step is counted from the same tokens, exactly.
"""
from __future__ import annotations

import random

import pyarrow as pa

from moescope.frame import Frame
from moescope.schema import EXPERT_STEP, ROUTING


def write_trace(store, run: str, trace: dict[int, list[tuple[int, tuple[int, ...]]]], num_experts: int, top_k: int,
                layer: int = 0, shuffle_seed: int | None = None, rank: int = 0, producer: str | None = None,
                routing_positions: set[int] | None = None) -> None:
    """One frame per step; shuffle_seed writes the steps and their rows in a shuffled order.

    routing_positions keeps routing rows only for those positions (sampling); expert_step stays exact.
    """
    steps = sorted(trace)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(steps)
    meta = {"layers": [{"layer": layer, "module_path": f"layers.{layer}.mlp", "num_experts": num_experts, "top_k": top_k,
                        "router_kind": "softmax-topk", "capacity_factor": None}]}
    for seq_no, step in enumerate(steps):
        tokens = trace[step]
        routing = [dict(run=run, checkpoint="c0", step=step, rank=rank, microbatch=0, seq=0, pos=pos, token_id=-1, layer=layer,
                        slot=slot, expert=e, weight=1.0 / len(experts), dropped=False, domain=None, phase="train")
                   for pos, experts in tokens for slot, e in enumerate(experts)
                   if routing_positions is None or pos in routing_positions]
        if shuffle_seed is not None:
            random.Random(shuffle_seed + step).shuffle(routing)
        load = [sum(e == x for _, experts in tokens for e in experts) for x in range(num_experts)]
        top1 = [sum(experts[0] == x for _, experts in tokens) for x in range(num_experts)]
        agg = [dict(run=run, checkpoint="c0", step=step, rank=rank, layer=layer, expert=x, num_tokens=len(tokens),
                    tokens=load[x], dropped=0, top1=top1[x], prob_sum=float(load[x]) / top_k, weight_sum=float(load[x]) / top_k,
                    phase="train") for x in range(num_experts)]
        tables = {"routing": pa.Table.from_pylist(routing, schema=ROUTING), "expert_step": pa.Table.from_pylist(agg, schema=EXPERT_STEP)}
        store.write_frame(Frame(run=run, producer=producer or f"{run}-{rank}", seq=seq_no, tables=tables, meta=meta))


def top1_trace(loads: list[int], steps: list[int]) -> dict[int, list[tuple[int, tuple[int, ...]]]]:
    """Top-1 tokens: expert x gets loads[x] tokens at each step, positions 0, 1, 2, ..."""
    experts = [x for x, n in enumerate(loads) for _ in range(n)]
    return {s: [(pos, (x,)) for pos, x in enumerate(experts)] for s in steps}


def simulate(xs, size):
    """LRU and LFU (uses since loading, least recently used on a tie) caches of `size`, access by access."""
    lru, lfu, uses, last = [], {}, {}, {}
    lru_hits, lfu_hits = [], []
    for i, e in enumerate(xs):
        lru_hits.append(e in lru)
        if e in lru:
            lru.remove(e)
        elif len(lru) == size:
            lru.pop(0)
        lru.append(e)
        lfu_hits.append(e in lfu)
        if e in lfu:
            uses[e] += 1
        else:
            if len(lfu) == size:
                victim = min(lfu, key=lambda j: (uses[j], last[j]))
                del lfu[victim], uses[victim]
            lfu[e], uses[e] = True, 1
        last[e] = i
    return lru_hits, lfu_hits
