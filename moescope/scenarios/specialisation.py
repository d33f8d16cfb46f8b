"""`moescope scenario specialisation`: do experts prefer code, prose, arithmetic or records?

One run is trained, then the held-out probe set (labelled by domain) is recorded through
the final model; domain specialisation (OLMoE, Muennighoff et al. 2024, Eq. 7: the share
of a domain's tokens that have expert i in their top-k) is read back per layer and
domain, beside the uniform baseline k/E. OLMoE finds strong specialisation for
specialised domains (arXiv, GitHub) and little for general text. Reported as found.
"""
from __future__ import annotations

from moescope.kernels import MoEConfig
from moescope.scenarios.report import Context, Report
from moescope.scenarios.training import Setup, evaluate, held_out_batches, train

SETUP = Setup(moe=MoEConfig(num_experts=8, top_k=2, score="softmax", aux_loss_coef=1e-2))


def run(ctx: Context, *, setup: Setup = SETUP) -> Report:
    report = Report("specialisation")
    name = ctx.run_id("train")
    trained = train(ctx.recorder, name, setup, steps=ctx.steps, seed=ctx.seed, progress=ctx.progress)
    evaluate(ctx.recorder, trained.model, held_out_batches(setup), run=name, checkpoint="final", step=ctx.steps)
    report.runs.append(name)
    spec = ctx.metric("domain_specialisation", run=name, checkpoint="final", phase="eval")
    # An expert prefers a domain when it takes that domain's tokens more often than its own average over domains.
    spec["mean over domains"] = spec.groupby(["layer", "expert"]).share.transform("mean")
    spec["preference"] = spec.share / spec["mean over domains"]
    best = spec.sort_values("preference", ascending=False, kind="stable").groupby(["layer", "domain"], as_index=False).first()
    table = best[["layer", "domain", "expert", "share", "mean over domains", "uniform", "preference"]]
    report.tables["per domain, the expert that prefers it most (share of the domain's tokens with it in the top-k)"] = table
    pivot = spec.pivot_table(index=["layer", "expert"], columns="domain", values="share").reset_index()
    report.tables[f"share of each domain's tokens routed to each expert (uniform k/E = {spec.uniform.iloc[0]:.3f})"] = pivot
    strongest = table.loc[table.preference.idxmax()]
    report.notes.append(f"strongest preference: layer {strongest.layer}, expert {strongest.expert} takes {strongest.share:.0%} "
                        f"of {strongest.domain} tokens against {strongest['mean over domains']:.0%} over all domains "
                        f"(uniform {strongest.uniform:.0%})")
    report.check("some expert takes one domain's tokens at least 1.5x as often as its average over domains",
                 bool((table.preference >= 1.5).any()))
    return report

