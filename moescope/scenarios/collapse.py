"""`moescope scenario collapse` and its healthy twin `moescope scenario balanced`.

collapse: two runs. The first has no balancing at all and the router is left alone.
The second is the balanced recipe with a fault planted: from step `steps // 2` a logit
bias of +6 on expert 3 of the last MoE layer (the router then puts that expert in nearly
every token's top-k), so the only collapse in it is the planted one.
balanced: the Switch auxiliary loss (alpha = 1e-2), nothing planted.
Each run is judged by collapse detection (`store.metric("collapse")`: verdict, onset
step and evidence per layer) and by an alert rule per layer, MaxVio > 2.5 over a 5-step
window (one expert in nearly every token's top-2), replayed over the run's history.
"""
from __future__ import annotations

import pandas as pd
import torch

from moescope.kernels import MoEConfig
from moescope.scenarios.report import Context, Report
from moescope.scenarios.training import Setup, train

SETUP = Setup(moe=MoEConfig(num_experts=8, top_k=2, score="softmax", aux_loss_coef=0.0))
BALANCED_AUX = 1e-2
FAULT_EXPERT, FAULT_LOGIT = 3, 6.0
FLAGGED = ("collapsing", "collapsed")
# An expert in nearly every token's top-k: MaxVio tops out at E/k - 1 = 3 for 8 experts, top-2.
ALERT = {"metric": "maxvio", "comparison": ">", "threshold": 2.5, "window_steps": 5}


def plant_logit_bias(model, layer: int, expert: int, value: float) -> None:
    """Add `value` to one expert's router logit in MoE layer `layer` (the router's fault-injection buffer)."""
    router = model.moe_blocks()[layer].router
    with torch.no_grad():
        router.logit_bias_E[expert] = value


def run(ctx: Context, *, setup: Setup = SETUP) -> Report:
    report = Report("collapse")
    layer = setup.num_layers - 1
    fault_step = max(1, ctx.steps // 2)

    def fault(step, model):
        if step == fault_step:
            plant_logit_bias(model, layer, FAULT_EXPERT, FAULT_LOGIT)

    verdicts, fired = {}, {}
    balanced = setup.with_moe(aux_loss_coef=BALANCED_AUX)
    for label, recipe, before_step in (("unbalanced", setup, None), ("planted", balanced, fault)):
        name = ctx.run_id(label)
        train(ctx.recorder, name, recipe, steps=ctx.steps, seed=ctx.seed, progress=ctx.progress, before_step=before_step)
        report.runs.append(name)
        verdicts[label], fired[label] = judged(ctx, report, name, label)
    planted = verdicts["planted"].set_index("layer")
    report.check(f"collapse detection flags layer {layer} of the planted run, and no other layer",
                 list(planted.index[planted.verdict.isin(FLAGGED)]) == [layer])
    hit = planted.loc[layer]
    report.check(f"expert {FAULT_EXPERT} is the one that took over",
                 any(e == FAULT_EXPERT and r == "took_over" for e, r in zip(hit.evidence_experts, hit.evidence_roles)))
    report.check(f"the alert fires on layer {layer} only, after the fault (step {fault_step})",
                 bool(fired["planted"][layer]) and min(fired["planted"][layer]) >= fault_step
                 and not any(steps for i, steps in fired["planted"].items() if i != layer))
    onset = "none" if pd.isna(hit.onset_step) else int(hit.onset_step)
    report.notes.append(f"planted run: onset dated to step {onset} (fault planted at step {fault_step})")
    return report


def run_balanced(ctx: Context, *, setup: Setup = SETUP) -> Report:
    report = Report("balanced")
    name = ctx.run_id("switch-loss")
    train(ctx.recorder, name, setup.with_moe(aux_loss_coef=BALANCED_AUX), steps=ctx.steps, seed=ctx.seed,
          progress=ctx.progress)
    report.runs.append(name)
    verdict, fired = judged(ctx, report, name, "balanced")
    report.check("collapse detection flags no layer", not verdict.verdict.isin(FLAGGED).any())
    report.check("the alert never fires", not any(fired.values()))
    return report


def judged(ctx: Context, report: Report, run: str, label: str) -> tuple[pd.DataFrame, dict[int, list[int]]]:
    """Collapse verdict per layer, and the steps where each layer's alert rule fires, added to the report."""
    from moescope.analysis import alerts

    verdict = ctx.metric("collapse", run=run)
    report.tables[f"{label}: collapse detection"] = verdict[["layer", "verdict", "onset_step", "summary"]]
    fired = {}
    for layer in verdict.layer:
        name = f"{run}-maxvio-layer{int(layer)}"
        rule = alerts.get_rule(ctx.store, name) or alerts.add_rule(ctx.store, name, run=run, layer=int(layer), **ALERT)
        fired[int(layer)] = [t["step"] for t in alerts.replay(ctx.store, rule, run) if t["state"] == "firing"]
    report.notes.append(f"{label}: alert MaxVio > {ALERT['threshold']:g} over {ALERT['window_steps']} steps per layer: "
                        + "; ".join(f"layer {layer} " + (f"fires at step {', '.join(map(str, steps))}" if steps else "never fires")
                                    for layer, steps in fired.items()))
    return verdict, fired
