"""`moescope scenario loss-free`: DeepSeek-style bias balancing against the auxiliary loss.

Three runs from the same initial weights and data, sigmoid routing (as in the paper):
Loss-Free Balancing (bias_E += u * sign(mean load - load_E) after every step, u = 1e-3,
no aux loss), the Switch auxiliary loss (alpha = 1e-3), and no balancing at all as the
reference. MaxVio_global is read back from the store over the held-out set replayed
after training (phase "eval"), MaxVio per batch over the second half of training, and
validation loss beside them. Loss-Free Balancing (Wang et al. 2024, Table 2) reports
MaxVio_global 0.04 against 0.72 (1B) and 0.04 against 0.52 (3B) for the aux loss, with
validation perplexity 9.50 vs 9.56 and 7.92 vs 7.97.
"""
from __future__ import annotations

import math

import pandas as pd

from moescope.kernels import MoEConfig
from moescope.scenarios.report import Context, Report
from moescope.scenarios.training import Setup, evaluate, held_out_batches, train

BIAS_RATE = 1e-3
AUX_COEF = 1e-3
SETUP = Setup(moe=MoEConfig(num_experts=8, top_k=2, score="sigmoid", aux_loss_coef=0.0))
VARIANTS = {"loss-free (u=1e-3)": {"bias_update_rate": BIAS_RATE},
            "aux loss (alpha=1e-3)": {"aux_loss_coef": AUX_COEF},
            "no balancing": {}}
PAPER = pd.DataFrame([{"model": "1B (paper)", "loss-free MaxVio_global": 0.04, "aux-loss MaxVio_global": 0.72,
                       "loss-free val ppl": 9.50, "aux-loss val ppl": 9.56},
                      {"model": "3B (paper)", "loss-free MaxVio_global": 0.04, "aux-loss MaxVio_global": 0.52,
                       "loss-free val ppl": 7.92, "aux-loss val ppl": 7.97}])


def run(ctx: Context) -> Report:
    report = Report("loss-free")
    held_out = held_out_batches(SETUP)
    rows = []
    for label, changes in VARIANTS.items():
        name = ctx.run_id(label.split(" (")[0].replace(" ", "-"))
        trained = train(ctx.recorder, name, SETUP.with_moe(**changes), steps=ctx.steps, seed=ctx.seed,
                        progress=ctx.progress)
        val = evaluate(ctx.recorder, trained.model, held_out, run=name, checkpoint="final", step=ctx.steps)
        report.runs.append(name)
        on_val = ctx.metric("maxvio", run=name, by="window", phase="eval")
        on_train = ctx.metric("maxvio", run=name, by="window", phase="train", steps=(ctx.steps // 2 + 1, ctx.steps))
        rows.append({"balancing": label, "MaxVio_global (held-out)": on_val.maxvio_global_mean_layers.iloc[0],
                     "MaxVio_batch (train, 2nd half)": on_train.maxvio_batch_mean_layers.iloc[0],
                     "val loss": val, "val ppl": math.exp(val)})
    table = pd.DataFrame(rows)
    report.tables["balance and quality, averaged over layers"] = table
    report.tables["paper (Wang et al. 2024, Table 2)"] = PAPER
    by = table.set_index("balancing")
    free, aux = by.loc["loss-free (u=1e-3)"], by.loc["aux loss (alpha=1e-3)"]
    report.check("loss-free balancing has the lower MaxVio_global", free["MaxVio_global (held-out)"] < aux["MaxVio_global (held-out)"])
    report.check("loss-free balancing has the lower validation loss", free["val loss"] < aux["val loss"])
    return report
