"""Capacity what-if: the drop rate each capacity factor would have caused per layer (replaying the
recorded assignments), with the drops the run really recorded beside it."""
from __future__ import annotations

import math

import dash
import pandas as pd
from dash import Input, Output, State, dcc, html

from moescope.analysis import compute_metric
from moescope.analysis.whatif import DEFAULT_FACTORS
from moescope.dashboard import figures, state
from moescope.dashboard.pages import common

PATH, NAME, PREFIX = "/capacity", "Capacity what-if", "cap"
MAX_FACTORS = 12


def parse_factors(text) -> tuple[list[float], str | None]:
    """'1, 1.25, 2' -> [1.0, 1.25, 2.0]; the defaults and a note when the text is not that."""
    if text in (None, ""):
        return list(DEFAULT_FACTORS), None
    try:
        factors = sorted({float(p) for p in str(text).replace(";", ",").split(",") if p.strip()})
    except ValueError:
        return list(DEFAULT_FACTORS), f"ignored capacity factors {str(text)[:60]!r}: not a comma-separated list of numbers"
    if not factors or any(not math.isfinite(c) or not 0 < c <= 1000 for c in factors) or len(factors) > MAX_FACTORS:
        return list(DEFAULT_FACTORS), (f"ignored capacity factors {str(text)[:60]!r}: give 1 to {MAX_FACTORS} "
                                       "numbers between 0 and 1000")
    return factors, None


def layout(**query) -> html.Div:
    view, problems = state.parse(query)
    factors = state.first_value(query.get("factors"))  # checked by the callback, which names a bad list
    controls = [common.run_picker(PREFIX, view.runs), common.checkpoint_picker(PREFIX, view.checkpoint),
                common.layer_input(PREFIX, view.layer, placeholder="all (pooled)"), *common.step_inputs(PREFIX, view),
                common.labelled("Capacity factors", dcc.Input(id="cap-factors", type="text", value=factors, debounce=True,
                                                              placeholder=", ".join(map(str, DEFAULT_FACTORS))),
                                "cap-factors")]
    body = [html.Div(className="row", children=[common.graph("cap-curve", className="half"),
                                                common.graph("cap-heatmap", className="half")]),
            html.Div(id="cap-table")]
    search = state.search(runs=view.runs[:1], checkpoint=view.checkpoint, layer=view.layer, step_min=view.step_min,
                          step_max=view.step_max, factors=factors)
    return common.page(PREFIX, "Capacity what-if", "Capacity C = ⌈T·k/E · factor⌉ per expert and batch; slots "
                       "beyond it are dropped. Predicted drops replay the recorded routing under each factor.",
                       controls, body, problems, search, PATH)


def pooled(df: pd.DataFrame) -> pd.DataFrame:
    """Per capacity factor, drops over all layers: summed drops over summed slots."""
    g = df.groupby("capacity_factor", as_index=False)[["slots", "predicted_dropped", "recorded_dropped"]].sum()
    return g.assign(predicted_drop_rate=g["predicted_dropped"] / g["slots"].where(g["slots"] > 0))


def register(app: dash.Dash, ctx: common.Context) -> None:
    common.register_run_options(app, ctx, PREFIX)
    common.register_checkpoint_options(app, ctx, PREFIX)
    common.register_url_sync(app, PREFIX, PATH, {"runs": "cap-runs", "checkpoint": "cap-checkpoint", "layer": "cap-layer",
                                                 "step_min": "cap-step-min", "step_max": "cap-step-max",
                                                 "factors": "cap-factors"})

    def empty(msg, problems=None):
        fig = figures.empty_figure(msg)
        return fig, fig, None, common.message(problems, msg)

    @app.callback(Output("cap-curve", "figure"), Output("cap-heatmap", "figure"), Output("cap-table", "children"),
                  Output("cap-message", "children"),
                  Input("cap-runs", "value"), Input("cap-checkpoint", "value"), Input("cap-layer", "value"),
                  Input("cap-step-min", "value"), Input("cap-step-max", "value"), Input("cap-factors", "value"),
                  State("cap-problems", "data"))
    @common.guarded(empty)
    def update(run, checkpoint, layer, step_min, step_max, factors_text, problems):
        if not run:
            return empty("pick a run", problems)
        ctx.store.require_run(run)
        steps, step_note = common.window(step_min, step_max)
        factors, factor_note = parse_factors(factors_text)
        layer_id, layer_note = None, None
        if layer not in (None, ""):
            layer_id, _, layer_note = common.pick_layer(ctx.store, run, layer)
        df = compute_metric(ctx.store, "predicted_drops", run=run, steps=steps, checkpoint=checkpoint or None,
                            by="window", capacity_factors=factors)
        notes = [step_note, factor_note, layer_note]
        if df.empty:
            return empty(figures.NO_DATA, problems + [n for n in notes if n])
        part = pooled(df) if layer_id is None else df[df["layer"] == layer_id]
        where = "all layers pooled" if layer_id is None else f"layer {layer_id}"
        recorded = float(part["recorded_dropped"].iloc[0] / part["slots"].iloc[0]) if part["slots"].iloc[0] else float("nan")
        curve = figures.xy_lines({"predicted": part}, "capacity_factor", "predicted_drop_rate",
                                 title=f"Predicted drop rate by capacity factor — {where}", x_title="capacity factor (×)",
                                 y_title="drop rate (fraction of slots)", uirevision=f"{run}|{layer_id}")
        if math.isfinite(recorded):
            curve.add_hline(y=recorded, line={"color": "#d62728", "dash": "dot"},
                            annotation_text=f"recorded drop rate {recorded:.2%}", annotation_position="top right")
        heat = figures.matrix_heatmap(
            df.pivot_table(index="layer", columns="capacity_factor", values="predicted_drop_rate", aggfunc="sum"),
            title="Predicted drop rate per layer and capacity factor", x_title="capacity factor (×)", y_title="layer",
            colour_title="drop rate", zrange=(0.0, None), colorscale="Reds", uirevision=run)
        table = html.Table([html.Thead(html.Tr([html.Th(h) for h in (
            "capacity factor", "slots", "predicted dropped", "predicted drop rate", "recorded dropped",
            "recorded drop rate")])),
            html.Tbody([html.Tr([html.Td(f"{r.capacity_factor:g}"), html.Td(f"{int(r.slots):,}"),
                                 html.Td(f"{int(r.predicted_dropped):,}"), html.Td(f"{r.predicted_drop_rate:.2%}"),
                                 html.Td(f"{int(r.recorded_dropped):,}"),
                                 html.Td(f"{r.recorded_dropped / r.slots:.2%}" if r.slots else "—")])
                        for r in part.itertuples()])], id="cap-table-rows", className="table")
        return curve, heat, html.Section([html.H3(f"Drops — {where}"), table], className="panel"), \
            common.message(problems, *notes)
