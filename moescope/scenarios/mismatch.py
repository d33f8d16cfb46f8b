"""`moescope scenario mismatch`: the same tokens routed twice, and how often the top-k set differs.

A model is trained briefly, then the held-out probe set goes through it several ways,
each recorded as an eval checkpoint of one run: fp32 twice (the control: identical
forwards must agree everywhere), bf16 weights, and the Triton backend in fp32 (on CPU
the Triton interpreter, which is exact in fp32 only). The comparison is SQL over the
recorded routing rows: per layer the share of tokens whose top-k set differs, and the
share of tokens that differ in at least one layer. These are the numbers behind
rollout routing replay (R3; Ma et al. 2025), which measured about 10% of router
decisions differing per layer between inference and training engines and 94% of
tokens differing in at least one layer (Qwen3-30B-A3B, 48 MoE layers).
"""
from __future__ import annotations

import os
import sys
from dataclasses import replace

import pandas as pd
import torch

from moescope.kernels import MoEConfig, MoETransformer
from moescope.scenarios.report import Context, Report
from moescope.scenarios.training import Setup, evaluate, held_out_batches, train

SETUP = Setup(moe=MoEConfig(num_experts=8, top_k=2, score="softmax"), num_layers=4)
PAPER = {"layer": "about 10%", "any layer": "94%"}


def topk_mismatch(store, run: str, a: str, b: str) -> tuple[pd.DataFrame, float]:
    """Per layer: tokens and the share whose top-k set differs between eval checkpoints a and b; and the share
    of tokens differing in at least one layer. Tokens are matched on (microbatch, seq, pos) and token id."""
    pair = f"""
        WITH s AS (SELECT checkpoint, microbatch, seq, pos, layer, any_value(token_id) AS token_id,
                          list_sort(list(expert)) AS experts
                   FROM routing WHERE phase = 'eval' AND checkpoint IN (?, ?) GROUP BY ALL),
        a AS (SELECT * FROM s WHERE checkpoint = ?), b AS (SELECT * FROM s WHERE checkpoint = ?),
        j AS (SELECT microbatch, seq, pos, layer, a.experts <> b.experts AS differs
              FROM a JOIN b USING (microbatch, seq, pos, layer) WHERE a.token_id = b.token_id)"""
    params = [a, b, a, b]
    per_layer = store.sql(pair + " SELECT layer, count(*) AS tokens, avg(differs::DOUBLE) AS differs FROM j "
                                 "GROUP BY layer ORDER BY layer", params, run=run)
    anywhere = store.sql(pair + " SELECT avg(d::DOUBLE) AS share FROM "
                                "(SELECT bool_or(differs) AS d FROM j GROUP BY microbatch, seq, pos)", params, run=run)
    return per_layer, float(anywhere.share.iloc[0])


def use_triton_interpreter() -> None:
    """On CPU the Triton kernels run on the interpreter, chosen before Triton is first imported (torch may import it)."""
    if not torch.cuda.is_available() and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def triton_available() -> bool:
    use_triton_interpreter()
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def run(ctx: Context, *, setup: Setup = SETUP, sequences_per_domain: int = 2, with_triton: bool = True) -> Report:
    report = Report("mismatch")
    use_triton_interpreter()  # before training: the optimiser's first step may import Triton
    name = ctx.run_id("routes")
    trained = train(ctx.recorder, name, setup, steps=ctx.steps, seed=ctx.seed, progress=ctx.progress)
    report.runs.append(name)
    probe_set = held_out_batches(setup, sequences_per_domain=sequences_per_domain, batch_size=8)
    state = {k: v.clone() for k, v in trained.model.state_dict().items()}
    # Each variant routes the same probe tokens; recorded as an eval checkpoint of the run.
    variants = {"fp32": trained.model, "fp32-again": trained.model,
                "bf16": _rebuilt(setup, state).to(torch.bfloat16)}
    if with_triton and triton_available():
        variants["triton-fp32"] = _rebuilt(replace(setup, backend="triton"), state)
    else:
        report.notes.append("Triton is not available here: torch vs Triton not compared")
    for checkpoint, model in variants.items():
        evaluate(ctx.recorder, model, probe_set, run=name, checkpoint=checkpoint, step=ctx.steps)
    rows = []
    for label, other in (("fp32 vs fp32, same forward twice", "fp32-again"), ("fp32 vs bf16 weights", "bf16"),
                         ("torch vs Triton, fp32", "triton-fp32")):
        if other not in variants:
            continue
        per_layer, anywhere = topk_mismatch(ctx.store, name, "fp32", other)
        rows.append({"comparison": label, "tokens": int(per_layer.tokens.iloc[0]),
                     **{f"layer {int(r.layer)} (%)": 100 * r.differs for r in per_layer.itertuples()},
                     "any layer (%)": 100 * anywhere})
    table = pd.DataFrame(rows)
    report.tables["tokens whose top-k set differs"] = table
    pct = table.set_index("comparison")["any layer (%)"]
    report.check("identical forwards route identically (0%)", pct["fp32 vs fp32, same forward twice"] == 0)
    report.check("bf16 weights change some top-k sets (> 0%)", pct["fp32 vs bf16 weights"] > 0)
    report.notes.append(f"R3 paper (Qwen3-30B-A3B, inference vs training engine): {PAPER['layer']} per layer, "
                        f"{PAPER['any layer']} of tokens in at least one layer")
    return report


def _rebuilt(setup: Setup, state: dict) -> MoETransformer:
    model = MoETransformer.from_config(setup.model_config())
    model.load_state_dict(state)
    return model
