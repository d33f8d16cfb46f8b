"""`moescope scenario drift`: checkpoints of one run replayed on a probe set — saturation and last fluctuation.

One run saves `CHECKPOINTS` checkpoints (plus step 0); each is replayed through the
same registered probe set (held-out corpus sequences) with moescope.probe.replay, and
the store's drift metrics compare them on exactly those tokens: router saturation
against the final checkpoint (OLMoE, Muennighoff et al. 2024, Eq. 5: about 60% after 1%
of pretraining, about 80% by 40%, rising towards 1) and the last-fluctuation CDF of each
token's top-1 expert (StableMoE, Dai et al. 2022, which finds routing still fluctuating
late in training).
"""
from __future__ import annotations

import pandas as pd
import torch

from moescope.kernels import MoEConfig, MoETransformer
from moescope.scenarios.report import Context, Report
from moescope.scenarios.training import Setup, train
from moescope.token_texts import ByteTokenizer

SETUP = Setup(moe=MoEConfig(num_experts=8, top_k=2, score="softmax", aux_loss_coef=1e-2))
CHECKPOINTS = 6


def register_corpus_probe_set(store, setup: Setup, sequences_per_domain: int = 4) -> str:
    """The bundled corpus's held-out sequences at this sequence length, registered once per store."""
    from moescope.probe_sets import ProbeSet

    name = f"corpus-{setup.seq_len}x{sequences_per_domain}"
    store.register_probe_set(name, ProbeSet.from_corpus(seq_len=setup.seq_len, sequences_per_domain=sequences_per_domain))
    return name


def run(ctx: Context, *, setup: Setup = SETUP, checkpoints: int = CHECKPOINTS) -> Report:
    from moescope.probe.replay import replay

    report = Report("drift")
    name = ctx.run_id("train")
    trained = train(ctx.recorder, name, setup, steps=ctx.steps, seed=ctx.seed, progress=ctx.progress,
                    checkpoints=checkpoints)
    report.runs.append(name)
    probe_set = register_corpus_probe_set(ctx.store, setup)
    model = MoETransformer.from_config(setup.model_config())
    for checkpoint, step, path in trained.checkpoints:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        replay(model, ctx.store, probe_set, run=name, checkpoint=checkpoint, step=step, path=str(path),
               tokenizer=ByteTokenizer())
    saturation = ctx.metric("saturation", run=name, probe_set=probe_set)
    fluctuation = ctx.metric("fluctuation", run=name, probe_set=probe_set)
    table = (saturation.groupby(["checkpoint", "step"], as_index=False, sort=False)
             .agg(saturation=("saturation", "mean"), baseline=("baseline", "first"))
             .merge(fluctuation.groupby(["checkpoint", "step"], as_index=False, sort=False)
                    .agg(last_fluctuation_cdf=("cdf", "mean")), on=["checkpoint", "step"]))
    table = table.sort_values("step", kind="stable").reset_index(drop=True)
    report.tables[f"replayed on probe set {probe_set}, mean over layers"] = table
    sat = table.saturation.to_numpy()
    report.check("saturation ends at 1 (the final checkpoint against itself)", abs(sat[-1] - 1) < 1e-9)
    report.check("saturation of the first checkpoint is the lowest", sat[0] == sat.min())
    report.check("saturation rises at every checkpoint", bool((pd.Series(sat).diff().dropna() >= -1e-9).all()))
    report.notes.append(f"saturation at step 0: {sat[0]:.2f} (random baseline k/E = {table.baseline.iloc[0]:.2f})")
    return report
