"""Placement and expert-cache what-if speed over a large store, next to the SQL alternatives.

    python benchmarks/bench_whatif.py --rows 100000000 [--store DIR] [--repeat 3] [--ep-size 4]

Builds (or reuses, with --store pointing at a store that already holds run "bench") the
store of benchmarks/bench_query.py: E=8 top-2, 4 layers, 4096 tokens per layer per step.
Then times, best of --repeat:
- placement by step (contiguous): loads from expert_step + one streamed pass over the
  routing rows for the all-to-all copies;
- the same answer's routing part as one SQL query grouping rows per token (bit_or of the
  chosen experts, then a histogram of expert sets per step, layer and home device): the
  obvious way to get co-activation per token in DuckDB;
- a raw DuckDB GROUP BY step, layer, expert over the routing files: the floor any
  pass over every routing row pays;
- placement by window with every policy, fitted on the first half and evaluated on the
  second (two passes for the co-activation fit and the fit-window figures);
- expert_cache over --cache-steps steps of one layer (its LFU replay is a Python loop).
Budget (issue 15): placement what-if over 100M routing rows <= 5 s on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import duckdb

sys.path.insert(0, str(Path(__file__).parent))
from bench_query import LAYERS, RUN, populate  # noqa: E402

from moescope.analysis import compute_metric  # noqa: E402
from moescope.analysis.store import AnalysisStore as Store  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000, help="routing rows to generate (default 10M)")
    ap.add_argument("--store", default=None, help="store directory (default: a temporary one); reused if it holds the run")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ep-size", type=int, default=4)
    ap.add_argument("--cache-steps", type=int, default=200, help="steps of layer 0 replayed by the expert_cache timing")
    ap.add_argument("--skip-sql", action="store_true", help="skip the per-token SQL alternative (slow at 100M rows)")
    args = ap.parse_args()
    root = args.store or tempfile.mkdtemp(prefix="moescope-bench-whatif-")
    store = Store(root)
    t0 = time.perf_counter()
    if RUN not in set(store.runs().run):
        populate(store, args.rows)
        print(f"generated the store in {time.perf_counter() - t0:.1f}s")
    n_rows = int(store.sql("SELECT count(*) AS n FROM routing", run=RUN).n[0])
    n_steps = int(store.sql("SELECT count(DISTINCT step) AS n FROM expert_step", run=RUN).n[0])
    print(f"store {root}: {n_rows:,} routing rows, {n_steps} steps, {LAYERS} layers; "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, duckdb {duckdb.__version__}")
    g = args.ep_size
    files = store.segment_paths("routing", RUN)

    def raw(q: str):
        con = duckdb.connect(":memory:")
        try:
            return con.execute(q.replace("FROM T", f"FROM read_parquet({files!r})", 1)).df()
        finally:
            con.close()

    half = n_steps // 2
    rows = [("raw GROUP BY step, layer, expert (floor)",
             lambda: raw("SELECT step, layer, expert, count(*) FROM T GROUP BY ALL"), args.repeat),
            ("placement by step, contiguous (moescope)", lambda: compute_metric(store, "placement", RUN, ep_size=g), args.repeat)]
    if not args.skip_sql:
        rows.append(("per-token SQL: expert sets per step/layer/home", lambda: raw(f"""
            WITH t AS (SELECT step, layer, any_value(pos) % {g} AS home, bit_or(1::UBIGINT << expert) AS sig FROM T
                       GROUP BY checkpoint, step, rank, microbatch, seq, pos, layer)
            SELECT step, layer, home, sig, count(*) AS n FROM t GROUP BY ALL"""), 1))
    rows += [
        ("placement by window, all policies, fit 1st half", lambda: compute_metric(
            store, "placement", RUN, ep_size=g, policy="all", by="window", fit_steps=(0, half - 1), steps=(half, n_steps)), 1),
        (f"expert_cache, layer 0, {args.cache_steps} steps", lambda: compute_metric(
            store, "expert_cache", RUN, layers=[0], steps=(0, args.cache_steps - 1), cache_sizes=[2, 4]), 1),
    ]
    # The machine may be shared: CPU seconds (all threads of this process) show the work done
    # whatever the load; wall seconds are what a user waits for.
    print(f"{'what':52s} {'wall s':>8s} {'CPU s':>8s} {'wall x floor':>13s} {'load':>6s}")
    floor = None
    for label, fn, repeat in rows:
        wall, cpu = best_wall_and_cpu(fn, repeat)
        floor = floor or wall
        print(f"{label:52s} {wall:8.2f} {cpu:8.2f} {wall / floor:13.2f} {os.getloadavg()[0]:6.1f}", flush=True)


def best_wall_and_cpu(fn, repeat: int) -> tuple[float, float]:
    runs = []
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        fn()
        runs.append((time.perf_counter() - w, time.process_time() - c))
    return min(runs)


if __name__ == "__main__":
    main()
