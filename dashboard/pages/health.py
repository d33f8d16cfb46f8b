"""Router health: per-token entropy, z and top-1/top-2 margin of one layer as p05–p95 bands with
the mean over steps, and the mean entropy of every layer as a layer × step heatmap to pick a layer."""
from __future__ import annotations

import dash
import numpy as np
import pandas as pd
from dash import Input, Output, State, html

from moescope.analysis import compute_metric
from moescope.dashboard import figures, state, summaries
from moescope.dashboard.pages import common

PATH, NAME, PREFIX = "/health", "Router health", "health"
BANDS = {  # metric -> (title, y axis)
    "entropy": ("Router entropy per token", "entropy (nats)"),
    "z": ("Router z (squared logsumexp of the logits)", "z = (log Σ exp logits)²"),
    "margin": ("Top-1 minus top-2 probability", "margin (probability)"),
}


def layout(**query) -> html.Div:
    view, problems = state.parse(query)
    controls = [common.run_picker(PREFIX, view.runs), common.layer_input(PREFIX, view.layer),
                *common.step_inputs(PREFIX, view), common.smoothing_input(PREFIX, view.smoothing)]
    body = [html.Div(className="row", children=[common.graph(f"health-{m}", className="half") for m in BANDS]),
            common.graph("health-layer-heatmap"), html.Div(id="health-collapse")]
    search = state.search(runs=view.runs[:1], layer=view.layer, step_min=view.step_min, step_max=view.step_max,
                          smoothing=view.smoothing)
    return common.page(PREFIX, "Router health", "How decided the router is, per token: the band spans the 5th to "
                       "95th percentile of the layer's tokens at each step, the line is the mean. Click a row of the "
                       "heatmap to pick a layer.", controls, body, problems, search, PATH)


# A cell lists at most this many experts, and shows at most this many characters of a summary (all in its tooltip):
# at 256 experts a collapsed layer has a hundred and more.
CELL_ITEMS = 16
CELL_CHARS = 300


def _cell(v) -> html.Td:
    if isinstance(v, np.generic):  # pandas hands a nullable Int64 (the onset step) over as a numpy scalar
        v = v.item()
    if isinstance(v, (list, tuple, np.ndarray)):
        items = [str(x) for x in (v.tolist() if isinstance(v, np.ndarray) else v)]
        if len(items) > CELL_ITEMS:
            return html.Td(", ".join(items[:CELL_ITEMS]) + f" … (+{len(items) - CELL_ITEMS} more)", title=", ".join(items))
        return html.Td(", ".join(items) or "—")
    if v is None or pd.isna(v):  # None, NaN and pandas' NA (a nullable onset step)
        return html.Td("—")
    text = f"{v:.3f}" if isinstance(v, float) else str(v)  # shares: fixed places line up down a column
    return html.Td(text[:CELL_CHARS] + " …", title=text) if len(text) > CELL_CHARS + 2 else html.Td(text)


def _table(df, columns: list[str], table_id: str) -> html.Table:
    shown = [c for c in columns if c in df.columns]
    return html.Table([html.Thead(html.Tr([html.Th(c.replace("_", " ")) for c in shown])),
                       html.Tbody([html.Tr([_cell(getattr(r, c)) for c in shown]) for r in df.itertuples()])],
                      id=table_id, className="table")


def collapse_onsets(store, run: str, layer: int | None) -> tuple[list[int], html.Section | None]:
    """The layer's collapse onset steps and the verdict and evidence tables, when the collapse metric exists."""
    verdicts = summaries.collapse_table(store, run)
    if verdicts is None:
        return [], None
    if verdicts.empty:
        return [], html.P("no collapse verdict for this scope", className="muted")
    rows = verdicts if layer is None else verdicts[verdicts["layer"] == layer]
    onsets = [int(s) for s in rows["onset_step"] if pd.notna(s)]
    evidence = summaries.collapse_table(store, run, detail="evidence")
    if layer is not None:  # the picked layer's: every layer's is thousands of rows at 64 layers × 256 experts
        evidence = evidence[evidence["layer"] == layer]
    return onsets, html.Section(className="panel", children=[
        html.H3("Collapse verdicts per layer (onsets marked on the charts of their layer)"),
        _table(verdicts, ["layer", "verdict", "onset_step", "evidence_experts", "evidence_roles", "summary"],
               "health-collapse-table"),
        html.H3("Evidence experts" + ("" if layer is None else f" — layer {layer}")),
        _table(evidence, ["layer", "expert", "role", "verdict", "onset_step", "share_before", "share_after",
                          "share_now", "uniform"], "health-evidence-table") if not evidence.empty
        else html.P("no expert moved enough to count as evidence", className="muted")])


def register(app: dash.Dash, ctx: common.Context) -> None:
    common.register_drill_down(app, "health-layer-heatmap", "health-layer")
    common.register_run_options(app, ctx, PREFIX)
    common.register_url_sync(app, PREFIX, PATH, {"runs": "health-runs", "layer": "health-layer",
                                                 "step_min": "health-step-min", "step_max": "health-step-max",
                                                 "smoothing": "health-smoothing"})
    outputs = [Output(f"health-{m}", "figure") for m in BANDS] + [
        Output("health-layer-heatmap", "figure"), Output("health-collapse", "children"),
        Output("health-message", "children")]

    def empty(msg, problems=None):
        fig = figures.empty_figure(msg)
        return [fig] * (len(BANDS) + 1) + [None, common.message(problems, msg)]

    @app.callback(outputs, Input("health-runs", "value"), Input("health-layer", "value"),
                  Input("health-step-min", "value"), Input("health-step-max", "value"),
                  Input("health-smoothing", "value"), Input("refresh-charts", "n_intervals"), State("health-problems", "data"))
    @common.guarded(empty)
    def update(run, layer, step_min, step_max, smoothing, _n, problems):
        if not run:
            return empty("pick a run", problems)
        with ctx.store.reading(run):  # one segment listing and one connection for the page's queries
            return draw(run, layer, step_min, step_max, smoothing, problems)

    def draw(run, layer, step_min, step_max, smoothing, problems):
        steps, layer_id, meta, notes = common.resolve(ctx.store, run, layer, step_min, step_max)
        weight, smooth_note = common.smoothing_weight(smoothing)
        if layer_id is None:
            return empty(figures.NO_DATA, problems)
        phase = summaries.series_phase(ctx.store, run)
        onsets, collapse = collapse_onsets(ctx.store, run, layer_id)
        bands = []
        for metric, (title, y_title) in BANDS.items():
            df = compute_metric(ctx.store, metric, run=run, layers=[layer_id], steps=steps, by="step", phase=phase)
            uniform = float(df["uniform"].iloc[0]) if metric == "entropy" and not df.empty else None
            bands.append(figures.band_chart(df, title=f"{title} — layer {layer_id}", y_title=y_title,
                                            uirevision=f"{run}|{layer_id}", smoothing=weight, baseline=uniform,
                                            baseline_label="uniform routing (ln E)" if uniform else "", onsets=onsets))
        means = compute_metric(ctx.store, "entropy", run=run, steps=steps, by="step", phase=phase, quantiles=False)
        heat = figures.step_heatmap(means, "mean", "layer", title=f"Mean router entropy per layer and step — {run}",
                                    row_title="layer", colour_title="entropy (nats)", colorscale="Cividis",
                                    uirevision=run)
        return bands + [heat, collapse, common.message(problems, *notes, smooth_note)]
