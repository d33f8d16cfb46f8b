"""The Dash page: run and checkpoint pickers, load heatmap, MaxVio and entropy over steps,
dead experts, domain specialisation and alert events, refreshed every few seconds.

Every number comes from `moescope.analysis.compute_metric` or the alerts module over the
store; nothing here opens a database.
"""
from __future__ import annotations

import logging
import time

import dash
import pandas as pd
from dash import Input, Output, State, dcc, html
from flask import Flask

from moescope.analysis import alerts, compute_metric
from moescope.collector.store import Store, StoreError
from moescope.dashboard import figures

log = logging.getLogger(__name__)

EMPTY_MESSAGE = "No runs recorded yet — run `moescope demo` to record one, or attach the probe to your model."
_SHOW, _HIDE = {}, {"display": "none"}


def create_dash(store: Store, *, requests_prefix: str = "/dash/", refresh_ms: int = 5000) -> dash.Dash:
    """A Dash app on its own Flask server, to be mounted at `requests_prefix` of the FastAPI app."""
    app = dash.Dash(__name__, server=Flask(__name__), requests_pathname_prefix=requests_prefix,
                    routes_pathname_prefix="/", title="moescope", update_title=None,
                    suppress_callback_exceptions=False)
    app.layout = _layout(refresh_ms)
    _register_callbacks(app, store)
    return app


def _layout(refresh_ms: int) -> html.Div:
    graph_config = {"displaylogo": False}
    return html.Div(className="page", children=[
        html.Header(className="topbar", children=[
            html.H1("moescope"), html.Span("Mixture-of-Experts router observability", className="tagline")]),
        dcc.Interval(id="refresh", interval=refresh_ms, n_intervals=0),
        dcc.Markdown(EMPTY_MESSAGE, id="empty-message", className="empty", style=_HIDE),
        html.Div(id="controls", className="controls", children=[
            html.Div([html.Label("Run", htmlFor="run-picker"),
                      dcc.Dropdown(id="run-picker", clearable=False, placeholder="pick a run")], className="picker"),
            html.Div([html.Label("Checkpoint", htmlFor="checkpoint-picker"),
                      dcc.Dropdown(id="checkpoint-picker", clearable=True, placeholder="all checkpoints")],
                     className="picker"),
            html.Div(id="run-summary", className="summary"),
        ]),
        html.Div(id="content", children=[
            dcc.Graph(id="load-heatmap", config=graph_config, figure=figures.empty_figure("loading…")),
            html.Div(className="row", children=[
                dcc.Graph(id="maxvio-chart", className="half", config=graph_config, figure=figures.empty_figure("loading…")),
                dcc.Graph(id="entropy-chart", className="half", config=graph_config, figure=figures.empty_figure("loading…")),
            ]),
            html.Div(className="row", children=[
                html.Section(className="half panel", children=[
                    html.H3("Dead and starved experts"), html.Div(id="dead-experts")]),
                html.Section(className="half panel", children=[
                    html.H3("Alerts"), html.Div(id="alerts-panel")]),
            ]),
            html.Div(id="domain-section", style=_HIDE, children=[
                dcc.Graph(id="domain-heatmap", config=graph_config, figure=figures.empty_figure("loading…"))]),
        ]),
    ])


def _table(df: pd.DataFrame, *, table_id: str) -> html.Table:
    head = html.Thead(html.Tr([html.Th(c) for c in df.columns]))
    body = html.Tbody([html.Tr([html.Td(v) for v in row]) for row in df.itertuples(index=False)])
    return html.Table([head, body], id=table_id, className="table")


def _ids(values) -> str:
    values = list(values) if values is not None else []
    return ", ".join(str(int(v)) for v in values) or "—"


def dead_experts_table(store: Store, run: str, checkpoint: str | None) -> html.Div | html.Table:
    df = compute_metric(store, "dead_experts", run=run, checkpoint=checkpoint, by="window")
    if df.empty:
        return html.P("no expert load recorded for this selection", className="muted")
    shown = pd.DataFrame({
        "layer": df["layer"].astype(int), "experts": df["num_experts"].astype(int), "dead": df["dead"].astype(int),
        "dead ids": [_ids(v) for v in df["dead_ids"]], "starved (<0.1 of fair share)": df["starved"].astype(int),
        "starved ids": [_ids(v) for v in df["starved_ids"]]})
    return _table(shown, table_id="dead-experts-table")


def alerts_list(store: Store, run: str) -> html.Div | html.Table:
    events = alerts.list_events(store, run=run, limit=20)
    rules = {r["id"]: r for r in alerts.list_rules(store)}
    if not events:
        return html.P(f"no alert events for this run ({len(rules)} rule(s) configured)", className="muted")
    rows = []
    for e in events:
        rule = rules.get(e["rule_id"], {})
        rows.append({"when": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["created_at"])),
                     "rule": rule.get("name", str(e["rule_id"])), "state": e["state"],
                     "metric": rule.get("metric", ""), "layer": "all" if e["layer"] is None else e["layer"],
                     "value": "" if e["value"] is None else f"{e['value']:.4g}",
                     "threshold": f"{rule.get('comparison', '')} {rule.get('threshold', '')}", "step": e["step"]})
    return _table(pd.DataFrame(rows), table_id="alerts-table")


def series_phase(store: Store, run: str) -> str | None:
    """The phase the over-steps charts follow: training when the run trained (replays of
    checkpoints through a probe set sit at checkpoint steps and would zigzag the
    series), else every phase (serving, eval-only runs)."""
    phases = store.sql("SELECT DISTINCT phase FROM expert_step", run=run)["phase"].tolist()
    return "train" if "train" in phases else None


def _register_callbacks(app: dash.Dash, store: Store) -> None:
    @app.callback(
        Output("run-picker", "options"), Output("run-picker", "value"),
        Output("empty-message", "style"), Output("controls", "style"), Output("content", "style"),
        Input("refresh", "n_intervals"), State("run-picker", "value"))
    def refresh_runs(_n, current):
        runs = store.runs()
        if runs.empty:
            return [], None, _SHOW, _HIDE, _HIDE
        names = list(runs["run"])
        options = [{"label": r, "value": r} for r in reversed(names)]  # newest first
        # Keep the user's choice across refreshes; default to the newest run.
        value = dash.no_update if current in names else names[-1]
        return options, value, _HIDE, _SHOW, _SHOW

    @app.callback(
        Output("checkpoint-picker", "options"), Output("checkpoint-picker", "value"),
        Input("run-picker", "value"), Input("refresh", "n_intervals"), State("checkpoint-picker", "value"))
    def refresh_checkpoints(run, _n, current):
        if not run:
            return [], None
        try:
            ckpts = store.checkpoints(run)
        except StoreError:
            return [], None
        names = list(ckpts["checkpoint"])
        options = [{"label": f"{c} (step {int(s)})" if pd.notna(s) else c, "value": c}
                   for c, s in zip(ckpts["checkpoint"], ckpts["step"])]
        if dash.ctx.triggered_id == "refresh" and (current in names or current is None):
            return options, dash.no_update
        return options, (names[-1] if names else None)

    @app.callback(
        Output("load-heatmap", "figure"), Output("dead-experts", "children"),
        Output("domain-heatmap", "figure"), Output("domain-section", "style"), Output("run-summary", "children"),
        Input("run-picker", "value"), Input("checkpoint-picker", "value"), Input("refresh", "n_intervals"))
    def refresh_checkpoint_panels(run, checkpoint, _n):
        if not run:
            empty = figures.empty_figure("pick a run")
            return empty, None, empty, _HIDE, None
        try:
            share = compute_metric(store, "load_share", run=run, checkpoint=checkpoint, by="window")
            heat = figures.load_heatmap(share, run=run, checkpoint=checkpoint)
            dead = dead_experts_table(store, run, checkpoint)
            spec = compute_metric(store, "domain_specialisation", run=run, checkpoint=checkpoint, by="window")
            layers = store.layers(run)
        except (StoreError, ValueError) as exc:  # e.g. the run vanished between refreshes
            log.warning("dashboard panels for run %r: %s", run, exc)
            empty = figures.empty_figure(str(exc))
            return empty, html.P(str(exc), className="muted"), empty, _HIDE, None
        domain = figures.domain_heatmap(spec, run=run)
        summary = f"{len(layers)} MoE layer(s); " + ", ".join(
            f"layer {int(r.layer)}: {int(r.num_experts)} experts, top-{int(r.top_k)} {r.router_kind}"
            for r in layers.itertuples()) if len(layers) else "no layer metadata registered"
        return heat, dead, domain, (_HIDE if spec.empty else _SHOW), summary

    @app.callback(
        Output("maxvio-chart", "figure"), Output("entropy-chart", "figure"), Output("alerts-panel", "children"),
        Input("run-picker", "value"), Input("refresh", "n_intervals"))
    def refresh_run_panels(run, _n):
        if not run:
            empty = figures.empty_figure("pick a run")
            return empty, empty, None
        try:
            phase = series_phase(store, run)
            maxvio = compute_metric(store, "maxvio", run=run, by="step", phase=phase)
            entropy = compute_metric(store, "entropy", run=run, by="step", quantiles=False, phase=phase)
            events = alerts_list(store, run)
        except (StoreError, ValueError) as exc:
            log.warning("dashboard charts for run %r: %s", run, exc)
            empty = figures.empty_figure(str(exc))
            return empty, empty, html.P(str(exc), className="muted")
        return figures.maxvio_chart(maxvio, run=run), figures.entropy_chart(entropy, run=run), events
