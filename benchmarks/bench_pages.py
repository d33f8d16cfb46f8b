"""Dashboard page callbacks end to end: each page's main callback answered by the Dash server.

    python benchmarks/bench_pages.py --rows 10000000 [--store DIR] [--repeat 3] [--layers 4 --experts 8 --top-k 2]

Fills a store as bench_query.py does (default E=8 top-2, 4 layers; 4096 tokens per layer
per step), then POSTs each page's data callback to /_dash-update-component through the Flask
test client — every query the page runs plus the JSON of its figures — and reports the
best of --repeat next to one plain DuckDB GROUP BY over the same routing files.
Budget (issue 10): each page's callbacks ≤ 1 s on 100M routing rows, 2 cores.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import duckdb

import bench_query
from bench_query import RUN, add_shape_args, best, populate  # same folder: run as a script from anywhere
from moescope.analysis.store import AnalysisStore as Store
from moescope.dashboard.dash_app import create_dash
from moescope.settings import Settings

# page -> (an output of its data callback, the values of its inputs and states; unset ones are None)
PAGES = {
    "Runs (health of every run)": ("runs-table-holder.children", {"runs-problems.data": [], "runs-select.value": []}),
    "Balance (mean over layers)": ("balance-maxvio.figure", {"balance-runs.value": [RUN], "balance-fixed.value": []}),
    "Balance (layer 0)": ("balance-maxvio.figure", {"balance-runs.value": [RUN], "balance-layer.value": 0,
                                                    "balance-fixed.value": ["1"]}),
    "Router health (layer 0)": ("health-entropy.figure", {"health-runs.value": RUN, "health-layer.value": 0}),
    "Specialisation (layer 0)": ("spec-domain.figure", {"spec-runs.value": RUN, "spec-layer.value": 0,
                                                        "spec-min-count.value": 10}),
    "Specialisation co-activation (l. 0)": ("spec-coactivation.figure", {"spec-runs.value": RUN, "spec-layer.value": 0}),
    "Specialisation repetition (layer 0)": ("spec-repetition.figure", {"spec-runs.value": RUN, "spec-layer.value": 0}),
    "Capacity what-if": ("cap-curve.figure", {"cap-runs.value": RUN}),
    "Placement what-if (layer 0, 5 policies)": ("wi-balancedness.figure", {
        "wi-runs.value": RUN, "wi-layer.value": 0, "wi-dtype.value": "bfloat16", "wi-hidden.value": 4096,
        "wi-policies.value": ["contiguous", "round_robin", "eplb", "eplb_global", "coactivation"]}),
    "Cache what-if (layer 0, N = 1, 2, 4, 8)": ("wi-cache-curve.figure", {"wi-runs.value": RUN, "wi-layer.value": 0}),
    "Alerts": ("alerts-rules.children", {"alerts-runs.value": RUN, "alerts-changed.data": 0}),
}


def request_body(deps: list[dict], output: str, values: dict) -> dict:
    dep = next(d for d in deps if output in d["output"].strip(".").split("..."))
    outputs = [dict(zip(("id", "property"), o.rsplit(".", 1))) for o in dep["output"].strip(".").split("...")]
    fill = lambda items: [{**i, "value": values.get(f"{i['id']}.{i['property']}", 0 if i["property"] == "n_intervals"  # noqa: E731
                                                         else None)} for i in items]
    inputs = fill(dep["inputs"])
    return {"output": dep["output"], "outputs": outputs if len(outputs) > 1 else outputs[0], "inputs": inputs,
            "state": fill(dep["state"]), "changedPropIds": [f"{inputs[0]['id']}.{inputs[0]['property']}"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000, help="routing rows to generate (default 10M)")
    ap.add_argument("--store", default=None, help="store directory (default: a temporary one)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", default="", help="only the page callbacks whose label contains this text")
    add_shape_args(ap)
    args = ap.parse_args()
    bench_query.set_shape(args.layers, args.experts, args.top_k)
    store = Store(args.store or tempfile.mkdtemp(prefix="moescope-bench-pages-"))
    if RUN not in set(store.runs().run):
        t0 = time.perf_counter()
        n_steps = populate(store, args.rows)
        print(f"wrote {args.rows:,} routing rows ({n_steps} steps, {args.layers} layers, E={args.experts}, "
              f"k={args.top_k}) in {time.perf_counter() - t0:.1f}s")
    app = create_dash(store, settings=Settings(api_token=None))
    client = app.server.test_client()
    client.get("/")  # Dash sets up the page routes on the first request
    deps = json.loads(client.get("/_dash-dependencies").data)

    def page(output, values):
        resp = client.post("/_dash-update-component", json=request_body(deps, output, values))
        assert resp.status_code in (200, 204), resp.data[:300]
        return resp

    files = store.segment_paths("routing", RUN)

    def raw():
        con = duckdb.connect(":memory:")
        try:
            return con.execute(f"SELECT step, layer, expert, count(*) FROM read_parquet({files!r}) GROUP BY ALL").df()
        finally:
            con.close()

    base = best(raw, args.repeat)
    print(f"plain GROUP BY (step, layer, expert) over the routing files: {base:.3f} s")
    # "first" includes what a page caches until the run writes again (collapse verdicts); "best" is a refresh.
    print(f"{'page callback':36s} {'first s':>8s} {'best s':>8s} {'best/GROUP BY':>14s} {'JSON kB':>8s}")
    for label, (output, values) in ((k, v) for k, v in PAGES.items() if args.only in k):
        t0 = time.perf_counter()
        size = len(page(output, values).data) / 1024
        first = time.perf_counter() - t0
        took = best(lambda: page(output, values), args.repeat)
        print(f"{label:36s} {first:8.3f} {took:8.3f} {took / base:14.2f} {size:8.0f}")


if __name__ == "__main__":
    main()
