"""Balance: MaxVio, CV, Switch score and drop rate over steps (runs overlaid, EMA smoothing),
a layer × step MaxVio heatmap to drill into a layer, that layer's expert × step load, and the load
per device under the run's recorded expert -> device map (balance_devices)."""
from __future__ import annotations

import dash
import pandas as pd
from dash import Input, Output, State, dcc, html

from moescope.analysis import compute_metric
from moescope.dashboard import figures, state, summaries
from moescope.dashboard.pages import balance_devices, common

PATH, NAME, PREFIX = "/balance", "Balance", "balance"
LINE_CHARTS = {  # metric -> (column, title, y axis)
    "maxvio": ("maxvio", "MaxVio per step (0 = perfectly balanced)", "MaxVio (load excess over mean, ×)"),
    "cv": ("cv", "Coefficient of variation of expert load", "CV (std / mean)"),
    "switch_score": ("switch_score", "Switch balance score (1 = uniform)", "E · Σ f·P"),
    "drop_rate": ("drop_rate", "Drop rate (dropped slots / all slots)", "drop rate (fraction)"),
}


def layout(**query) -> html.Div:
    view, problems = state.parse(query)
    fixed = str(query.get("fixed_scale", "")).lower() in ("1", "true", "yes")
    controls = [common.run_picker(PREFIX, view.runs, multi=True),
                common.layer_input(PREFIX, view.layer, placeholder="all (mean)"),
                *common.step_inputs(PREFIX, view), common.smoothing_input(PREFIX, view.smoothing),
                common.rank_picker(PREFIX, view.ranks),
                html.Div(dcc.Checklist(id="balance-fixed", options=[{"label": " fixed colour scale (0–3× fair share)",
                                                                      "value": "1"}],
                                       value=["1"] if fixed else []), className="picker")]
    body = [html.Div(className="row", children=[common.graph(f"balance-{m}", className="half") for m in LINE_CHARTS]),
            common.graph("balance-layer-heatmap"), common.graph("balance-expert-heatmap"), balance_devices.row()]
    search = state.search(runs=view.runs, layer=view.layer, step_min=view.step_min, step_max=view.step_max,
                          smoothing=view.smoothing, fixed_scale="1" if fixed else None, ranks=view.ranks)
    return common.page(PREFIX, "Balance", "Expert load balance over steps. Leave the layer empty for the mean over "
                       "layers; click a row of the layer heatmap to drill into that layer.", controls, body, problems,
                       search, PATH)


def mean_over_layers(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per-step value over all layers: summed drops over summed slots for the drop rate, else the mean."""
    if df.empty:
        return pd.DataFrame(columns=["step", metric])
    if metric == "drop_rate":
        g = df.groupby("step", as_index=False)[["dropped", "slots"]].sum()
        return g.assign(drop_rate=g["dropped"] / g["slots"].where(g["slots"] > 0))[["step", "drop_rate"]]
    return df.groupby("step", as_index=False)[metric].mean()


def run_series(store, run: str, layer: int | None, steps, phase: str | None,
               ranks: list[int] | None = None) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """Per metric, the step series of one run (the layer's, or the mean over layers), and MaxVio of every layer."""
    every = compute_metric(store, "balance", run=run, steps=steps, by="step", phase=phase, ranks=ranks)
    maxvio = every[["step", "layer", "maxvio", "maxvio_mean_layers"]]
    out = {}
    for metric, (column, _, _) in LINE_CHARTS.items():
        df = every[["step", "layer", column, *(["dropped", "slots"] if metric == "drop_rate" else [])]]
        if layer is not None:
            out[metric] = df[df["layer"] == layer][["step", column]]
        else:
            out[metric] = mean_over_layers(df, column)
    return out, maxvio


def register(app: dash.Dash, ctx: common.Context) -> None:
    common.register_drill_down(app, "balance-layer-heatmap", "balance-layer")
    common.register_run_options(app, ctx, PREFIX, multi=True)
    common.register_rank_options(app, ctx, PREFIX)
    balance_devices.register(app, ctx)
    common.register_url_sync(app, PREFIX, PATH, {
        "runs": "balance-runs", "layer": "balance-layer", "step_min": "balance-step-min",
        "step_max": "balance-step-max", "smoothing": "balance-smoothing", "fixed_scale": "balance-fixed",
        "ranks": "balance-ranks"})
    outputs = [Output(f"balance-{m}", "figure") for m in LINE_CHARTS] + [
        Output("balance-layer-heatmap", "figure"), Output("balance-expert-heatmap", "figure"),
        Output("balance-message", "children")]

    def empty(msg, problems=None):
        fig = figures.empty_figure(msg)
        return [fig] * (len(LINE_CHARTS) + 2) + [common.message(problems, msg)]

    @app.callback(outputs, Input("balance-runs", "value"), Input("balance-layer", "value"),
                  Input("balance-step-min", "value"), Input("balance-step-max", "value"),
                  Input("balance-smoothing", "value"), Input("balance-fixed", "value"), Input("refresh-charts", "n_intervals"),
                  Input("balance-ranks", "value"), State("balance-problems", "data"))
    @common.guarded(empty)
    def update(runs, layer, step_min, step_max, smoothing, fixed, _n, ranks, problems):
        runs = [r for r in (runs or []) if r]
        if not runs:
            return empty("pick one or more runs", problems)
        steps, step_note = common.window(step_min, step_max)
        weight, smooth_note = common.smoothing_weight(smoothing)
        ranks, rank_note = common.rank_filter(ranks)
        notes = [step_note, smooth_note, rank_note]
        layer_id = None
        if layer not in (None, ""):
            layer_id, _, note = common.pick_layer(ctx.store, runs[0], layer)
            notes.append(note)
        per_metric: dict[str, dict[str, pd.DataFrame]] = {m: {} for m in LINE_CHARTS}
        first_maxvio = None
        phases = {}
        for run in runs:
            ctx.store.require_run(run)
            with ctx.store.reading(run):  # one segment listing and one connection for the run's queries
                phases[run] = summaries.series_phase(ctx.store, run)
                series, maxvio = run_series(ctx.store, run, layer_id, steps, phases[run], ranks)
            first_maxvio = maxvio if first_maxvio is None else first_maxvio
            for metric, df in series.items():
                per_metric[metric][run] = df
        where = f"layer {layer_id}" if layer_id is not None else "mean over layers"
        if ranks:
            where += f", rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
        key = f"{','.join(runs)}|{layer_id}"
        lines = [figures.step_lines(per_metric[m], column, title=f"{title} — {where}", y_title=y_title, smoothing=weight,
                                    uirevision=key, baseline=1.0 if m == "switch_score" else None,
                                    baseline_label="uniform" if m == "switch_score" else "")
                 for m, (column, title, y_title) in LINE_CHARTS.items()]
        layer_heat = figures.step_heatmap(first_maxvio, "maxvio", "layer", title=f"MaxVio per layer and step — {runs[0]}",
                                          row_title="layer", colour_title="MaxVio", colorscale="Inferno",
                                          uirevision=runs[0])
        expert_layer = layer_id
        if expert_layer is None:
            expert_layer, _, _ = common.pick_layer(ctx.store, runs[0], None)
        if expert_layer is None:
            expert_heat = figures.empty_figure(figures.NO_DATA, "Expert load")
        else:
            util = compute_metric(ctx.store, "utilisation", run=runs[0], layers=[expert_layer], steps=steps, by="step",
                                  phase=phases[runs[0]], ranks=ranks)
            expert_heat = figures.step_heatmap(
                util, "utilisation", "expert", title=f"Expert load, layer {expert_layer} — {runs[0]} "
                f"({'fixed scale' if fixed else 'scale follows the data'})", row_title="expert",
                colour_title="load / fair share", zrange=figures.FIXED_UTILISATION_RANGE if fixed else None,
                uirevision=f"{runs[0]}|{expert_layer}")
        return lines + [layer_heat, expert_heat, common.message(problems, *notes)]
