"""Whole-run top-token counts of one layer: folded by bincount as the scan runs, against DuckDB's GROUP BY.

The Specialisation page's first look counts (layer, token id, expert) over every routing row
of a layer (analysis/vocab_counts.py). Both ways run alternately in one process on the same
store, the kept counts cleared before each, so the two see the same machine:

    python benchmarks/bench_vocab_counts.py --store /tmp/bench100m --repeat 3

The store is one bench_pages.py / bench_query.py writes (run "bench"); --layer picks the layer.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

from bench_query import RUN  # same folder: run as a script from anywhere
from moescope.analysis import vocab_counts
from moescope.analysis.store import AnalysisStore as Store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True, help="a store holding the benchmark run")
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    store = Store(args.store, create=False)
    if RUN not in set(store.runs().run):
        raise SystemExit(f"error: {args.store} holds no run {RUN!r}: write one with bench_pages.py --store")
    print(f"{os.cpu_count()} CPUs, {platform.machine()}, load {os.getloadavg()[0]:.1f}")
    dense = vocab_counts._DenseCounts.DENSE_CELLS
    times: dict[str, list[float]] = {"folded by bincount": [], "DuckDB GROUP BY": []}
    for _ in range(args.repeat):
        for label, cells in (("folded by bincount", dense), ("DuckDB GROUP BY", 0)):
            vocab_counts._DenseCounts.DENSE_CELLS = cells
            vocab_counts.KEPT.clear()
            t0 = time.perf_counter()
            counts = vocab_counts.whole_run_counts(store, RUN, "layer = ?", [args.layer])
            times[label].append(time.perf_counter() - t0)
    vocab_counts._DenseCounts.DENSE_CELLS = dense
    print(f"layer {args.layer}: {int(counts.routed.sum()):,} routing rows, {len(counts):,} (id, expert) groups")
    for label, ts in times.items():
        print(f"{label:20s} " + "  ".join(f"{t:.3f}" for t in ts) + " s")
    print(f"best: {min(times['folded by bincount']) / min(times['DuckDB GROUP BY']):.2f}x the GROUP BY")


if __name__ == "__main__":
    main()
