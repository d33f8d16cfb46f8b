"""Placement and expert-cache what-if speed over a large store, next to a plain GROUP BY of the same run.

    python benchmarks/bench_whatif.py --rows 100000000 [--store DIR] [--repeat 3] [--ep-size 4]

Builds (or reuses, with --store pointing at a store that already holds run "bench") the
store of benchmarks/bench_query.py: E=8 top-2, 4 layers, 4096 tokens per layer per step.
Then times each what-if twice over: "first", with the counts and streams the analysis keeps
between queries dropped (what a first look at a run costs: every routing row read), and
"again", the best of --repeat further calls (the same or another view of the same segments:
nothing read again but expert_step and the rollups). Rows:
- a plain DuckDB GROUP BY step, layer, expert over the routing files: the floor any pass
  over every routing row pays;
- placement by step, contiguous, every layer: loads from expert_step, all-to-all copies
  from each token's experts (signature counts of the routing rows);
- placement by window, every policy, fitted on the first half and judged on the second;
- the Placement page's two calls (layer 0, five policies: by window, then by step);
- expert_cache of layer 0 over the whole run, N = 1, 2, 4, 8 (the Cache page's call);
- with --sql, the per-token SQL alternative for the copies (expert sets per step, layer
  and home device by a GROUP BY per token).
Budget (issue 15): placement what-if over 100M routing rows <= 5 s on 2 cores. CPU seconds
(all threads of this process) are printed beside wall seconds, with the load average.
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

from moescope.analysis import compute_metric, expert_cache, placement_replay  # noqa: E402
from moescope.analysis.store import AnalysisStore as Store  # noqa: E402

POLICIES = ["contiguous", "round_robin", "eplb", "eplb_global", "coactivation"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000, help="routing rows to generate (default 10M)")
    ap.add_argument("--store", default=None, help="store directory (default: a temporary one); reused if it holds the run")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ep-size", type=int, default=4)
    ap.add_argument("--sql", action="store_true", help="also time the per-token SQL alternative (slow at 100M rows)")
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

    def forget() -> None:
        placement_replay.CACHE.clear()
        expert_cache.STREAMS.clear()

    half = n_steps // 2
    rows = [
        ("plain GROUP BY step, layer, expert (floor)", lambda: raw("SELECT step, layer, expert, count(*) FROM T GROUP BY ALL")),
        ("placement by step, contiguous, all layers", lambda: compute_metric(store, "placement", RUN, ep_size=g)),
        ("placement by window, 5 policies, fit 1st half", lambda: compute_metric(
            store, "placement", RUN, ep_size=g, policy=POLICIES, by="window", fit_steps=(0, half - 1), steps=(half, n_steps))),
        ("Placement page: layer 0, window + step", lambda: [compute_metric(
            store, "placement", RUN, ep_size=g, layers=[0], policy=POLICIES, by=by, hidden_size=4096) for by in ("window", "step")]),
        ("expert_cache layer 0, N = 1, 2, 4, 8", lambda: compute_metric(
            store, "expert_cache", RUN, layers=[0], cache_sizes=[1, 2, 4, 8])),
    ]
    if args.sql:
        rows.append(("per-token SQL: expert sets per step/layer/home", lambda: raw(f"""
            WITH t AS (SELECT step, layer, any_value(pos) % {g} AS home, bit_or(1::UBIGINT << expert) AS sig FROM T
                       GROUP BY checkpoint, step, rank, microbatch, seq, pos, layer)
            SELECT step, layer, home, sig, count(*) AS n FROM t GROUP BY ALL""")))
    print(f"{'what':48s} {'first s':>8s} {'CPU s':>6s} {'again s':>8s} {'CPU s':>6s} {'first/floor':>11s} "
          f"{'again/floor':>11s} {'load':>5s}")
    floor = None
    for label, fn in rows:
        forget()
        first = wall_and_cpu(fn)
        again = min(wall_and_cpu(fn) for _ in range(args.repeat))
        if floor is None:
            floor = min(first, again)[0]
        print(f"{label:48s} {first[0]:8.2f} {first[1]:6.2f} {again[0]:8.2f} {again[1]:6.2f} {first[0] / floor:11.2f} "
              f"{again[0] / floor:11.2f} {os.getloadavg()[0]:5.1f}", flush=True)


def wall_and_cpu(fn) -> tuple[float, float]:
    # The machine may be shared: CPU seconds (all threads of this process) show the work done whatever the load.
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


if __name__ == "__main__":
    main()
