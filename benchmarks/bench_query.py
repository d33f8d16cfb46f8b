"""Dashboard query latency: moescope.analysis metrics vs a raw DuckDB GROUP BY over the same files.

    python benchmarks/bench_query.py --rows 10000000 [--store DIR] [--repeat 3]

Writes N routing rows (E=8 top-2, 4 layers, 4096 tokens per layer per step, two
domains) through Store.write_frame in large frames, with the matching token_stats and
expert_step rows, then times each dashboard query (best of --repeat) next to the raw
GROUP BY a hand-written query would run over the same Parquet files.
Budget (BENCHMARKS.md): each dashboard query <= 1 s on 100M routing rows.
"""
from __future__ import annotations

import argparse
import tempfile
import time
import uuid

import duckdb
import numpy as np
import pyarrow as pa

from moescope.analysis import compute_metric
from moescope.analysis.store import AnalysisStore as Store
from moescope.frame import Frame
from moescope.schema import EXPERT_STEP, ROUTING, TOKEN_STATS

E, K, LAYERS, TOKENS = 8, 2, 4, 4096
RUN = "bench"


def frame_tables(rng: np.random.Generator, steps: range) -> dict[str, pa.Table]:
    n_tok = len(steps) * LAYERS * TOKENS
    step_T = np.repeat(np.array(list(steps), np.int64), LAYERS * TOKENS)
    layer_T = np.tile(np.repeat(np.arange(LAYERS, dtype=np.int16), TOKENS), len(steps))
    pos_T = np.tile(np.arange(TOKENS, dtype=np.int32) % 512, len(steps) * LAYERS)
    seq_T = np.tile(np.arange(TOKENS, dtype=np.int32) // 512, len(steps) * LAYERS)
    # K distinct experts per token: the first uniform, each next a random stride past the previous (strides sum < E).
    first = rng.integers(0, E, n_tok)
    strides = rng.integers(1, (E - 1) // max(1, K - 1) + 1, (n_tok, K - 1))
    experts = (first[:, None] + np.concatenate([np.zeros((n_tok, 1), np.int64), np.cumsum(strides, 1)], 1)) % E
    domain = np.where(seq_T % 2 == 0, "code", "text")
    ctx = {"run": pa.array([RUN] * n_tok), "checkpoint": pa.array(["c0"] * n_tok), "step": step_T,
           "rank": np.zeros(n_tok, np.int32), "microbatch": np.zeros(n_tok, np.int32), "seq": seq_T, "pos": pos_T,
           "token_id": rng.integers(0, 32000, n_tok, dtype=np.int32), "layer": layer_T}
    rep = lambda a: np.repeat(a, K)  # noqa: E731 - one routing row per (token, slot)
    routing = pa.table({**{c: (rep(np.asarray(v)) if not isinstance(v, pa.Array) else pa.array([v[0].as_py()] * (n_tok * K)))
                           for c, v in ctx.items()},
                        "slot": np.tile(np.arange(K, dtype=np.int8), n_tok), "expert": experts.ravel().astype(np.int16),
                        "weight": rng.random(n_tok * K, dtype=np.float32), "dropped": rng.random(n_tok * K) < 0.02,
                        "domain": rep(domain), "phase": pa.array(["train"] * (n_tok * K)),
                        "probe_set": pa.nulls(n_tok * K, pa.string())}, schema=ROUTING)
    stats = pa.table({**ctx, "entropy": rng.random(n_tok, dtype=np.float32) * 2, "logsumexp": rng.random(n_tok, dtype=np.float32),
                      "margin": rng.random(n_tok, dtype=np.float32), "domain": domain, "phase": pa.array(["train"] * n_tok),
                      "probe_set": pa.nulls(n_tok, pa.string())},
                     schema=TOKEN_STATS)
    rows = []
    for s in steps:
        for layer in range(LAYERS):
            loads = rng.multinomial(TOKENS * K, np.full(E, 1 / E))
            for e in range(E):
                rows.append((s, layer, e, TOKENS, int(loads[e]), int(loads[e] // 50), int(loads[e] // 2), loads[e] / K))
    a = np.array(rows, dtype=np.float64)
    es = pa.table({"run": [RUN] * len(rows), "checkpoint": ["c0"] * len(rows), "step": a[:, 0].astype(np.int64),
                   "rank": np.zeros(len(rows), np.int32), "layer": a[:, 1].astype(np.int16), "expert": a[:, 2].astype(np.int16),
                   "num_tokens": a[:, 3].astype(np.int64), "tokens": a[:, 4].astype(np.int64), "dropped": a[:, 5].astype(np.int64),
                   "top1": a[:, 6].astype(np.int64), "prob_sum": a[:, 7], "weight_sum": a[:, 7],
                   "phase": ["train"] * len(rows)}, schema=EXPERT_STEP)
    return {"routing": routing, "token_stats": stats, "expert_step": es}


def set_shape(layers: int, experts: int, top_k: int) -> None:
    """The model the stores are filled for (default 4 layers, E=8, top-2)."""
    global LAYERS, E, K
    if not (layers >= 1 and top_k >= 1 and experts >= top_k):
        raise SystemExit(f"need layers >= 1 and experts >= top-k >= 1, got {layers}, {experts}, {top_k}")
    LAYERS, E, K = layers, experts, top_k


def add_shape_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--layers", type=int, default=LAYERS, help=f"MoE layers (default {LAYERS})")
    ap.add_argument("--experts", type=int, default=E, help=f"experts per layer (default {E})")
    ap.add_argument("--top-k", type=int, default=K, help=f"experts per token (default {K})")


def populate(store: Store, rows: int, steps_per_frame: int | None = None) -> int:
    rng = np.random.default_rng(0)
    n_steps = max(1, rows // (LAYERS * TOKENS * K))
    steps_per_frame = steps_per_frame or max(1, 32 * 4 * 2 // (LAYERS * K))  # ~1M routing rows per frame
    meta = {"layers": [{"layer": i, "module_path": f"layers.{i}.mlp", "num_experts": E, "top_k": K,
                        "router_kind": "softmax-topk", "capacity_factor": 1.25} for i in range(LAYERS)]}
    for seq, lo in enumerate(range(0, n_steps, steps_per_frame)):
        tables = frame_tables(rng, range(lo, min(n_steps, lo + steps_per_frame)))
        store.write_frame(Frame(run=RUN, producer="bench", seq=seq, tables=tables, frame_id=uuid.uuid4().hex, meta=meta))
    return n_steps


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000, help="routing rows to generate (default 10M)")
    ap.add_argument("--store", default=None, help="store directory (default: a temporary one)")
    ap.add_argument("--repeat", type=int, default=3)
    add_shape_args(ap)
    args = ap.parse_args()
    set_shape(args.layers, args.experts, args.top_k)
    root = args.store or tempfile.mkdtemp(prefix="moescope-bench-")
    store = Store(root)
    t0 = time.perf_counter()
    n_steps = populate(store, args.rows)
    n_rows = int(store.sql("SELECT count(*) AS n FROM routing", run=RUN).n[0])
    print(f"wrote {n_rows:,} routing rows ({n_steps} steps, {LAYERS} layers, E={E}, k={K}) in {time.perf_counter() - t0:.1f}s")

    def raw(table: str, q: str):
        files = store.segment_paths(table, RUN)
        con = duckdb.connect(":memory:")
        try:
            return con.execute(q.replace("FROM T", f"FROM read_parquet({files!r})", 1)).df()
        finally:
            con.close()

    cases = [
        ("load heatmap (load_share by step)", lambda: compute_metric(store, "load_share", RUN),
         "routing", "SELECT step, layer, expert, count(*) FROM T GROUP BY ALL"),
        ("maxvio over steps", lambda: compute_metric(store, "maxvio", RUN),
         "routing", "SELECT step, layer, expert, count(*) FROM T GROUP BY ALL"),
        ("entropy over steps", lambda: compute_metric(store, "entropy", RUN, quantiles=False),
         "token_stats", "SELECT step, layer, avg(entropy) FROM T GROUP BY ALL"),
        ("domain specialisation", lambda: compute_metric(store, "domain_specialisation", RUN),
         "routing", "SELECT layer, domain, expert, count(*) FROM T GROUP BY ALL"),
    ]
    print(f"{'query':40s} {'moescope s':>11s} {'raw GROUP BY s':>15s} {'ratio':>7s}")
    for label, fn, table, q in cases:
        ours = best(fn, args.repeat)
        base = best(lambda: raw(table, q), args.repeat)
        print(f"{label:40s} {ours:11.3f} {base:15.3f} {ours / base:7.2f}")


if __name__ == "__main__":
    main()
