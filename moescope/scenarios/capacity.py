"""`moescope scenario capacity`: the share of tokens dropped against the capacity factor, with and without the aux loss.

Top-2 routing as in ST-MoE and top-1 as in Switch, trained at capacity factors 0.75,
1.25, 2.0 and 4.0, each with the Switch auxiliary loss (alpha = 1e-2) and without it.
Drops are read back from the store (the drop_rate metric over the second half of
training, when the router has settled), and by position bucket at factor 1.25.
ST-MoE (Zoph et al. 2022, Table 5) reports 10.6 / 0.3 / 0.0 / 0.0 % dropped with the
loss and 15.6 / 2.9 / 0.4 / 0.0 % without.
"""
from __future__ import annotations

from dataclasses import replace

import pandas as pd

from moescope.kernels import MoEConfig
from moescope.scenarios.report import Context, Report
from moescope.scenarios.training import Setup, train

FACTORS = (0.75, 1.25, 2.0, 4.0)
AUX_COEF = 1e-2
ROUTERS = {"top2": MoEConfig(num_experts=8, top_k=2, score="softmax"), "top1": MoEConfig.switch(num_experts=8)}
PAPER_TOP2 = {"with aux loss": (10.6, 0.3, 0.0, 0.0), "without": (15.6, 2.9, 0.4, 0.0)}
# Longer sequences and batches than the other scenarios: more tokens per step queue for each expert.
SIZE = {"seq_len": 64, "batch_size": 16}
POSITION_BUCKETS = 4
POSITION_FACTOR = 1.25


def settled_window(steps: int) -> tuple[int, int]:
    return steps // 2 + 1, steps


def dropped_share(store, run: str, steps: int) -> float:
    """Dropped slots over all slots, every layer together, from the exact per-expert aggregates."""
    from moescope.analysis import compute_metric

    df = compute_metric(store, "drop_rate", run=run, steps=settled_window(steps), by="window", phase="train")
    return float(df.dropped.sum() / df.slots.sum())


def run(ctx: Context, *, routers=tuple(ROUTERS), factors=FACTORS, setup: Setup | None = None) -> Report:
    """`setup` overrides the model size (the routing of each run still comes from ROUTERS and the factor)."""
    report = Report("capacity")
    drops, by_position = [], []
    for router in routers:
        for aux in (True, False):
            row = {"router": router, "aux loss": "with" if aux else "without"}
            for factor in factors:
                moe = replace(ROUTERS[router], capacity_factor=factor, aux_loss_coef=AUX_COEF if aux else 0.0)
                setup_ = replace(setup or Setup(moe=moe, **SIZE), moe=moe)
                name = ctx.run_id(router, f"cf{factor:g}", "aux" if aux else "noaux")
                train(ctx.recorder, name, setup_, steps=ctx.steps, seed=ctx.seed, progress=ctx.progress)
                report.runs.append(name)
                row[f"cf {factor:g}"] = 100 * dropped_share(ctx.store, name, ctx.steps)
                if factor == POSITION_FACTOR:
                    pos = ctx.metric("drop_rate", run=name, steps=settled_window(ctx.steps), by="window",
                                           phase="train", position_buckets=POSITION_BUCKETS)
                    pos = pos.groupby(["bucket"], as_index=False).agg(pos_lo=("pos_lo", "min"), pos_hi=("pos_hi", "max"),
                                                                     slots=("slots", "sum"), dropped=("dropped", "sum"))
                    by_position.append({"router": router, "aux loss": row["aux loss"],
                                        **{f"pos {r.pos_lo}-{r.pos_hi}": 100 * r.dropped / r.slots for r in pos.itertuples()}})
            drops.append(row)
    table = pd.DataFrame(drops)
    if len(factors) == len(FACTORS) and "top2" in routers:
        paper = [{"router": "ST-MoE top-2 (paper)", "aux loss": k.split()[0], **dict(zip(table.columns[2:], v))}
                 for k, v in PAPER_TOP2.items()]
        table = pd.concat([table, pd.DataFrame(paper)], ignore_index=True)
    report.tables[f"tokens dropped (%), steps {settled_window(ctx.steps)}"] = table
    if by_position:
        report.tables[f"dropped (%) by position at capacity factor {POSITION_FACTOR:g}"] = pd.DataFrame(by_position)
    _verdict(report, pd.DataFrame(drops), factors)
    return report


def _verdict(report: Report, drops: pd.DataFrame, factors) -> None:
    cols = [f"cf {f:g}" for f in factors]
    falls = all((row[cols].diff().dropna() <= 1e-9).all() for _, row in drops.iterrows())
    report.check("drops fall as the capacity factor rises (every router, with and without the loss)", falls)
    for router, g in drops.groupby("router", sort=False):
        with_, without = g[g["aux loss"] == "with"][cols].iloc[0], g[g["aux loss"] == "without"][cols].iloc[0]
        dropping = [c for c in cols if without[c] > 0 or with_[c] > 0]
        lower = [c for c in dropping if with_[c] < without[c]]
        report.check(f"{router}: the aux loss lowers drops at every factor that drops ({len(lower)}/{len(dropping)})",
                     len(lower) == len(dropping))
