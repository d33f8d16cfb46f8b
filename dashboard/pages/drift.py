"""Drift: one run's checkpoints replayed on a probe set — router saturation against the final
checkpoint, load divergence between consecutive checkpoints, the last-fluctuation CDF, and
domain specialisation of two checkpoints side by side."""
from __future__ import annotations

import dash
import pandas as pd
from dash import Input, Output, State, dcc, html

from moescope.analysis import compute_metric, drift
from moescope.dashboard import figures, state
from moescope.dashboard.pages import common

PATH, NAME, PREFIX = "/drift", "Drift", "drift"
MAX_PAIRS = 24  # consecutive checkpoint pairs drawn in the load-divergence heatmap (the latest ones)


def layout(**query) -> html.Div:
    view, problems = state.parse(query)
    probe_set = state.first_value(query.get("probe_set"))
    controls = [common.run_picker(PREFIX, view.runs),
                common.labelled("Probe set", dcc.Dropdown(id="drift-probe-set", value=probe_set, clearable=True,
                                                          options=[probe_set] if probe_set else [],
                                                          placeholder="the run's only one"), "drift-probe-set"),
                common.layer_input(PREFIX, view.layer),
                common.checkpoint_picker(PREFIX, view.checkpoint, label="Checkpoint A", placeholder="first replayed"),
                common.checkpoint_picker(PREFIX, view.checkpoint_b, suffix="checkpoint-b", label="Checkpoint B",
                                         placeholder="last replayed")]
    body = [html.Div(className="row", children=[common.graph("drift-saturation", className="half"),
                                                common.graph("drift-fluctuation", className="half")]),
            common.graph("drift-load-js"),
            html.Div(className="row", children=[common.graph("drift-domain-a", className="half"),
                                                common.graph("drift-domain-b", className="half")])]
    search = state.search(runs=view.runs[:1], probe_set=probe_set, layer=view.layer, checkpoint=view.checkpoint,
                          checkpoint_b=view.checkpoint_b)
    return common.page(PREFIX, "Drift", "How routing settles over training, measured on the same probe-set tokens "
                       "replayed through each checkpoint (record replays with `moescope replay`).", controls, body,
                       problems, search, PATH)


def register(app: dash.Dash, ctx: common.Context) -> None:
    common.register_run_options(app, ctx, PREFIX)
    common.register_checkpoint_options(app, ctx, PREFIX)
    common.register_checkpoint_options(app, ctx, PREFIX, suffix="checkpoint-b")
    common.register_url_sync(app, PREFIX, PATH, {"runs": "drift-runs", "probe_set": "drift-probe-set",
                                                 "layer": "drift-layer", "checkpoint": "drift-checkpoint",
                                                 "checkpoint_b": "drift-checkpoint-b"})

    @app.callback(Output("drift-probe-set", "options"), Input("drift-runs", "value"), Input("refresh", "n_intervals"))
    @common.guarded(lambda msg: [])
    def probe_sets(run, _n):
        return drift.replayed_probe_sets(ctx.store, run) if run else []

    charts = ["drift-saturation", "drift-fluctuation", "drift-load-js", "drift-domain-a", "drift-domain-b"]

    def empty(msg, problems=None):
        fig = figures.empty_figure(msg)
        return [fig] * len(charts) + [common.message(problems, msg)]

    @app.callback([Output(c, "figure") for c in charts] + [Output("drift-message", "children")],
                  Input("drift-runs", "value"), Input("drift-probe-set", "value"), Input("drift-layer", "value"),
                  Input("drift-checkpoint", "value"), Input("drift-checkpoint-b", "value"),
                  State("drift-problems", "data"))
    @common.guarded(empty)
    def update(run, probe_set, layer, ckpt_a, ckpt_b, problems):
        if not run:
            return empty("pick a run", problems)
        _, layer_id, meta, notes = common.resolve(ctx.store, run, layer, None, None)
        ps = drift.resolve_probe_set(ctx.store, run, probe_set or None)
        order = drift.replayed_checkpoints(ctx.store, run, ps)
        if len(order) < 2:
            return empty(f"run {run!r} has {len(order)} checkpoint replay(s) of probe set {ps!r}; drift needs two",
                         problems)
        E, k = (int(v) for v in meta.loc[meta["layer"] == layer_id, ["E", "k"]].iloc[0])
        sat = compute_metric(ctx.store, "saturation", run=run, probe_set=ps)
        mine = sat[sat["layer"] == layer_id]
        saturation = figures.xy_lines(
            {f"layer {layer_id}": mine, "mean over layers": sat.groupby(["step", "checkpoint"], as_index=False)
             ["saturation"].mean().sort_values("step"), "random (k/E)": mine.assign(saturation=k / E)},
            "checkpoint", "saturation", title=f"Router saturation against {order.checkpoint.iloc[-1]} ({ps})",
            x_title="checkpoint (training order)", y_title="share of top-k kept", x_category=True,
            uirevision=f"{run}|{layer_id}", dash_names={"random (k/E)"})
        fl = compute_metric(ctx.store, "fluctuation", run=run, layers=[layer_id], probe_set=ps)
        fluct = figures.xy_lines({f"layer {layer_id}": fl}, "checkpoint", "cdf",
                                 title="Last-fluctuation CDF: tokens whose top-1 has settled",
                                 x_title="checkpoint (training order)", y_title="share of tokens settled",
                                 x_category=True, uirevision=f"{run}|{layer_id}")
        names = list(order.checkpoint)
        pairs = list(zip(names[:-1], names[1:]))[-MAX_PAIRS:]
        js = pd.concat([compute_metric(ctx.store, "load_js", run=run, checkpoint_a=a, checkpoint_b=b, probe_set=ps)
                        for a, b in pairs], ignore_index=True)
        js["pair"] = js["checkpoint_a"] + " → " + js["checkpoint_b"]
        grid = js.pivot_table(index="layer", columns="pair", values="js", aggfunc="sum")[[f"{a} → {b}" for a, b in pairs]]
        load_js = figures.matrix_heatmap(grid, title="Load divergence between consecutive checkpoints (Jensen–Shannon)",
                                         x_title="checkpoint pair", y_title="layer", colour_title="JS (nats)",
                                         zrange=(0.0, None), colorscale="Reds", uirevision=run)
        a = ckpt_a if ckpt_a in names else names[0]
        b = ckpt_b if ckpt_b in names else names[-1]
        notes += [f"checkpoint {c!r} has no replay of {ps!r}; showing {d!r}" for c, d in ((ckpt_a, a), (ckpt_b, b))
                  if c and c != d]
        grids = {c: common.domain_grid(ctx.store, run, layer_id, c, k / E) for c in (a, b)}
        scale = figures.over_uniform_scale(*grids.values())  # one colour range: the two compare by colour
        dom_a, dom_b = (common.domain_figure(grids[c], f"Domain specialisation — {c}, layer {layer_id}", scale,
                                             uirevision=f"{run}|{layer_id}") for c in (a, b))
        return [saturation, fluct, load_js, dom_a, dom_b, common.message(problems, *notes)]
