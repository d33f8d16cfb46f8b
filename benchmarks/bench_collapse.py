"""Collapse detection lead time and false alarms: moescope's change-point verdict vs the simple rules.

Trains the tiny reference MoE on the bundled corpus with the probe writing to a local
store, once per (scenario, seed), and plants a router fault from a known step s0 through
each MoE router's `logit_bias_E` buffer:

  healthy     nothing planted
  takeover    +3.0 on one expert's logit of one layer (it takes over)
  starvation  -0.15·(step - s0) on one expert's logit (a slow starvation)
  layer       +6.0 on k experts of one layer (the whole layer collapses onto them)

Detection is online: after every step, each method looks only at the steps recorded so
far. moescope: `collapse` verdict collapsing/collapsed on the prefix (PELT change points,
analysis/collapse.py). Simple rules, per step as other tools alert: dead fraction > 0,
max/mean load > 5, mean router entropy < 0.6·ln E. Every method is armed after a warm-up
(default 16 steps: the untrained router moves fast at first, and a tool analyses routing
after warm-up); moescope's change-point fit sees the steps from the warm-up on. A detection before s0 (or at all, in a healthy run) is a
false alarm; delay = detection step − s0. s0 is drawn in [3/8, 5/8] of the run.

    python benchmarks/bench_collapse.py --seeds 20 --steps 64
"""
from __future__ import annotations

import argparse
import math
import platform
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from moescope.analysis.collapse import LayerSeries, Settings, judge, layer_series
from moescope.analysis.query import layer_meta, make_scope
from moescope.analysis.store import AnalysisStore as Store
from moescope.corpus import batches, build_corpus
from moescope.kernels import MoEConfig, ModelConfig, MoETransformer
from moescope.probe import attach

SCENARIOS = ("healthy", "takeover", "starvation", "layer")
METHODS = ("moescope", "dead>0", "max/mean>5", "entropy<0.6lnE")
E, K, LAYERS = 8, 2, 2


@dataclass
class Plan:
    scenario: str
    seed: int
    onset: int
    layer: int
    experts: list[int]

    def bias(self, step: int) -> float:
        if self.scenario == "healthy" or step < self.onset:
            return 0.0
        return {"takeover": 3.0, "starvation": -0.15 * (step - self.onset), "layer": 6.0}[self.scenario]


def plan(scenario: str, seed: int, steps: int) -> Plan:
    rng = np.random.default_rng(seed)
    onset = int(rng.integers(steps * 3 // 8, steps * 5 // 8 + 1))
    experts = rng.choice(E, size=K if scenario == "layer" else 1, replace=False).tolist()
    return Plan(scenario, seed, onset, int(rng.integers(LAYERS)), [int(x) for x in experts])


def train(store: Store, run: str, p: Plan, steps: int) -> None:
    cfg = ModelConfig(vocab_size=256, hidden_size=32, num_layers=LAYERS, num_heads=2, ffn_size=64, max_seq_len=32,
                      moe=MoEConfig(num_experts=E, top_k=K, score="softmax"))
    model = MoETransformer.from_config(cfg, seed=p.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = list(batches(build_corpus(seq_len=32, sequences_per_domain=32, seed=p.seed), batch_size=8,
                        generator=torch.Generator().manual_seed(p.seed)))
    router = model.moe_blocks()[p.layer].router
    with attach(model, sink=f"local:{store.root}", run=run, frame_interval_s=1e6) as probe:
        for step in range(steps):
            router.logit_bias_E[p.experts] = p.bias(step)
            probe.set_step(step)
            input_ids, attention_mask, domains = data[step % len(data)]
            probe.set_domains(domains)
            model(input_ids, attention_mask=attention_mask, labels=input_ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def window(s: LayerSeries, lo: int, hi: int) -> LayerSeries:
    return LayerSeries(s.layer, s.k, s.steps_N[lo:hi], s.load_NE[lo:hi], s.entropy_N[lo:hi], s.margin_N[lo:hi])


def detections(series: list[LayerSeries], settings: Settings, warmup: int) -> dict[str, tuple[int, int] | None]:
    """Per method: (step, layer) of its first alarm after the warm-up, or None."""
    found: dict[str, tuple[int, int] | None] = {m: None for m in METHODS}
    n = min(s.steps_N.size for s in series)
    for rows in range(warmup + 1, n + 1):
        for s in series:
            load_E, step = s.load_NE[rows - 1], int(s.steps_N[rows - 1])
            rules = {"dead>0": (load_E == 0).any(), "max/mean>5": load_E.max() > 5 * load_E.mean(),
                     "entropy<0.6lnE": s.entropy_N[rows - 1] < 0.6 * math.log(E)}
            for name, fired in rules.items():
                if fired and found[name] is None:
                    found[name] = (step, s.layer)
            if found["moescope"] is None:
                if judge(window(s, warmup, rows), settings).verdict in ("collapsing", "collapsed"):
                    found["moescope"] = (step, s.layer)
    return found


def summarise(results: list[dict]) -> list[dict]:
    rows = []
    for scenario in SCENARIOS:
        for method in METHODS:
            rs = [r for r in results if r["scenario"] == scenario]
            hits = [r[method] for r in rs]
            false = sum(1 for r, h in zip(rs, hits) if h is not None and (scenario == "healthy" or h[0] < r["onset"]))
            good = [(h[0] - r["onset"], h[1] == r["layer"]) for r, h in zip(rs, hits)
                    if h is not None and scenario != "healthy" and h[0] >= r["onset"]]
            delays = [d for d, _ in good]
            row = {"scenario": scenario, "method": method, "runs": len(rs), "false_alarms": false,
                   "detected": len(good), "right_layer": sum(1 for _, ok in good if ok),
                   "median_delay": float(np.median(delays)) if delays else float("nan"),
                   "p90_delay": float(np.percentile(delays, 90)) if delays else float("nan")}
            if method == "moescope" and scenario != "healthy":
                errs = [abs(r["onset_estimate"] - r["onset"]) for r in rs if r["onset_estimate"] is not None]
                row["onset_error_median"] = float(np.median(errs)) if errs else float("nan")
                row["onset_found"] = len(errs)
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=16, help="steps before any method may alarm")
    parser.add_argument("--store", default=None, help="store directory (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = args.store or tempfile.mkdtemp(prefix="bench-collapse-")
    store = Store(root)
    settings = Settings()
    results, started = [], time.perf_counter()
    for seed in range(args.seeds):
        for scenario in SCENARIOS:
            p = plan(scenario, seed, args.steps)
            run = f"{scenario}-{seed}"
            train(store, run, p, args.steps)
            series = layer_series(store, make_scope(run, by="window"), layer_meta(store, run))
            found = detections(series, settings, args.warmup)
            # Retrospective: the verdict on the whole run, at the planted layer.
            after = [window(s, args.warmup, s.steps_N.size) for s in series]
            full = {s.layer: judge(s, settings) for s in after}[p.layer]
            onset = None if full.onset_index is None else int(after[p.layer].steps_N[full.onset_index])
            results.append({"scenario": scenario, "seed": seed, "onset": p.onset, "layer": p.layer,
                            "onset_estimate": onset if full.verdict in ("collapsing", "collapsed") else None,
                            "verdicts": {s.layer: judge(s, settings).verdict for s in after}, **found})
        print(f"seed {seed} done, {time.perf_counter() - started:.0f}s", flush=True)
    print(f"\n{args.seeds} seeds x {len(SCENARIOS)} scenarios, {args.steps} steps each, "
          f"{time.perf_counter() - started:.0f}s on {platform.processor() or platform.machine()}, torch {torch.__version__}\n")
    print("| scenario | method | false alarms | detected (right layer) | median delay | p90 delay | onset error (median) |")
    print("|---|---|---|---|---|---|---|")
    for r in summarise(results):
        detected = "—" if r["scenario"] == "healthy" else f"{r['detected']}/{r['runs']} ({r['right_layer']})"
        onset = f"{r['onset_error_median']:.0f} steps ({r['onset_found']} runs)" if "onset_error_median" in r else ""
        delay = "" if r["scenario"] == "healthy" else f"{r['median_delay']:.0f}"
        p90 = "" if r["scenario"] == "healthy" else f"{r['p90_delay']:.0f}"
        print(f"| {r['scenario']} | {r['method']} | {r['false_alarms']}/{r['runs']} | {detected} | {delay} | {p90} | {onset} |")
    healthy_verdicts = [v for r in results if r["scenario"] == "healthy" for v in r["verdicts"].values()]
    print(f"\nwhole-run verdicts on healthy runs: "
          + ", ".join(f"{v} {healthy_verdicts.count(v)}" for v in ("healthy", "imbalanced", "collapsing", "collapsed")))


if __name__ == "__main__":
    main()
