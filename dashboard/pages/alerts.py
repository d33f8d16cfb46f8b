"""Alerts: the rules (created and deleted here with the API token), the series a rule evaluates
against its threshold, and the events timeline with each event linked to the run's balance at its step."""
from __future__ import annotations

import time

import dash
import pandas as pd
import plotly.graph_objects as go
from dash import ALL, Input, Output, State, dcc, html

from moescope.analysis import alerts
from moescope.dashboard import figures, state
from moescope.dashboard.deps import has_token, is_loopback
from moescope.dashboard.pages import common

PATH, NAME, PREFIX = "/alerts", "Alerts", "alerts"
EVENT_CONTEXT_STEPS = 50  # an event's link opens the balance charts this many steps either side of it


def layout(**query) -> html.Div:
    view, problems = state.parse(query)
    rule = state.first_value(query.get("rule"))
    if rule is not None:
        try:
            rule = str(alerts.rule_key(rule))
        except ValueError as exc:
            problems.append(f"ignored rule={rule[:40]!r}: {exc}")
            rule = None
    form = html.Section(className="panel", children=[
        html.H3("New rule"),
        html.Div(className="form", children=[
            common.labelled("Name", dcc.Input(id="alerts-new-name", type="text", placeholder="e.g. imbalance"),
                            "alerts-new-name"),
            common.labelled("Metric", dcc.Dropdown(id="alerts-new-metric", options=list(alerts.ALERT_METRICS),
                                                   value="maxvio", clearable=False), "alerts-new-metric"),
            common.labelled("Comparison", dcc.Dropdown(id="alerts-new-comparison", options=list(alerts.COMPARISONS),
                                                       value=">", clearable=False), "alerts-new-comparison",
                            "picker narrow"),
            common.number_input("alerts-new-threshold", "Threshold", None, placeholder="e.g. 0.5", step="any"),
            common.labelled("Run (empty: every run)", dcc.Input(id="alerts-new-run", type="text"), "alerts-new-run"),
            common.number_input("alerts-new-layer", "Layer (empty: all)", None, placeholder="all", minimum=0),
            common.labelled("Aggregation", dcc.Dropdown(id="alerts-new-aggregation", options=list(alerts.AGGREGATIONS),
                                                        value="window", clearable=False), "alerts-new-aggregation",
                            "picker narrow"),
            common.number_input("alerts-new-window", "Window (steps)", 50, placeholder="50", minimum=1),
            common.number_input("alerts-new-for", "Breaches before firing", 1, placeholder="1", minimum=1),
        ]),
        html.Div(className="form", children=[
            common.labelled("API token (MOESCOPE_API_TOKEN)", dcc.Input(id="alerts-token", type="password",
                                                                         autoComplete="off"), "alerts-token"),
            html.Button("Create rule", id="alerts-create", n_clicks=0, className="button"),
            html.Div(id="alerts-write-result", className="result")]),
    ])
    controls = [common.run_picker(PREFIX, view.runs),
                common.labelled("Rule to plot", dcc.Dropdown(id="alerts-rule", value=rule, options=[], clearable=True,
                                                             placeholder="pick a rule"), "alerts-rule")]
    body = [html.Section(className="panel", children=[html.H3("Rules"), html.Div(id="alerts-rules")]), form,
            common.graph("alerts-series"), common.graph("alerts-timeline"),
            html.Section(className="panel", children=[html.H3("Events"), html.Div(id="alerts-events")]),
            dcc.Store(id="alerts-changed", data=0), dcc.Store(id="alerts-url-rule", data=rule)]
    return common.page(PREFIX, "Alerts", "Rules watch a metric of a run (or every run) and fire after the set number "
                       "of consecutive breaches. Creating or deleting a rule needs the API token.", controls, body,
                       problems, state.search(runs=view.runs[:1], rule=rule), PATH)


def write_refusal(settings, token: str | None) -> str | None:
    """Why a write from the page is refused (the API's own rule), or None when it may go ahead."""
    if not settings.api_token and not is_loopback(settings.host):
        return f"writes are disabled: the server listens on {settings.host} and no MOESCOPE_API_TOKEN is configured"
    if not has_token(settings, f"Bearer {token or ''}"):
        return "missing or wrong API token"
    return None


# Shown under the rules when a rule has not been evaluated on the picked run: what evaluates rules, and when.
NOT_EVALUATED = ("\"not yet\": no evaluator has run this rule on this run since the rule was created. Rules are "
                 "evaluated by `moescope beat` (every alert_interval_s), or by `moescope serve --evaluate-alerts` where "
                 "no beat runs; a rule starts at the run's latest step. Pick it in \"Rule to plot\" to see its series "
                 "over the whole run.")


def evaluated(store, rule: dict, run: str | None) -> str:
    """How far live evaluation of `rule` has gone on `run`: "through step N", "not yet", or "—" (not its run)."""
    if not run or rule["run"] not in (None, run):
        return "—"
    state = store.alert_state(rule["id"], run)
    if state is None or state["last_step"] is None:
        return "not yet"
    return f"through step {state['last_step']}" + (" (firing)" if state["firing"] else "")


def rules_table(rules: list[dict], progress: list[str] | None = None) -> html.Div | html.P:
    """The rules, with how far each has been evaluated on the picked run (`progress`, one entry per rule) when given."""
    if not rules:
        return html.P("no alert rules yet", className="muted")
    head = ["id", "name", "metric", "scope", "condition", "aggregation", "breaches", "enabled"] + \
        (["evaluated on the run"] if progress is not None else []) + [""]
    rows = []
    for i, r in enumerate(rules):
        scope = r["run"] or "every run"
        scope += f", layer {r['layer']}" if r.get("layer") is not None else ""
        scope += f", expert {r['expert']}" if r.get("expert") is not None else ""
        agg = r["aggregation"] + (f" {r['window_steps']} steps" if r["aggregation"] == "window" else "")
        rows.append(html.Tr([html.Td(r["id"]), html.Td(r["name"]), html.Td(r["metric"]), html.Td(scope),
                             html.Td(f"{r['comparison']} {r['threshold']:g}"), html.Td(agg),
                             html.Td(r["for_evaluations"]), html.Td("yes" if r["enabled"] else "no"),
                             *([html.Td(progress[i])] if progress is not None else []),
                             html.Td(html.Button("delete", id={"type": "alerts-delete", "index": r["id"]},
                                                 n_clicks=0, className="button small"))]))
    table = html.Table([html.Thead(html.Tr([html.Th(h) for h in head])), html.Tbody(rows)], id="alerts-rules-table",
                       className="table")
    waiting = progress is not None and "not yet" in progress
    return html.Div([table, html.P(NOT_EVALUATED, id="alerts-not-evaluated", className="muted")] if waiting else [table])


def event_link(event: dict) -> str:
    step = int(event["step"]) if event.get("step") is not None else None
    window = {} if step is None else {"step_min": max(0, step - EVENT_CONTEXT_STEPS), "step_max": step + EVENT_CONTEXT_STEPS}
    return common.href("/balance", state.search(runs=[event["run"]], layer=event.get("layer"), **window))


def events_view(events: list[dict], names: dict[int, str]) -> tuple[go.Figure, html.Table | html.P]:
    if not events:
        return figures.empty_figure("no alert events for this scope", "Alert events"), \
            html.P("no alert events for this scope", className="muted")
    df = pd.DataFrame(events)
    df["rule"] = [names.get(r, str(r)) for r in df["rule_id"]]
    fig = go.Figure()
    for state_name, colour in (("firing", "#d62728"), ("resolved", "#2ca02c")):
        part = df[df["state"] == state_name]
        if not part.empty:
            fig.add_trace(go.Scatter(x=part["step"], y=part["rule"], mode="markers", name=state_name,
                                     marker={"color": colour, "size": 11, "symbol": "diamond"},
                                     customdata=part["run"],
                                     hovertemplate="%{y} " + state_name + "<br>run %{customdata}<br>step %{x}<extra></extra>"))
    fig.update_layout(title="Alert events by step", margin=figures._MARGIN, height=300,
                      xaxis=figures.step_axis(df["step"].dropna().astype("int64")),
                      yaxis={"title": {"text": "rule"}, "type": "category"}, legend={"orientation": "h", "y": -0.3})
    rows = [html.Tr([html.Td(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["created_at"]))),
                     html.Td(names.get(e["rule_id"], str(e["rule_id"]))), html.Td(e["state"]), html.Td(e["run"]),
                     html.Td("all" if e.get("layer") is None else e["layer"]),
                     html.Td("" if e.get("value") is None else f"{e['value']:.4g}"),
                     html.Td(dcc.Link(f"step {e['step']}", href=event_link(e), className="event-link"))])
            for e in events]
    table = html.Table([html.Thead(html.Tr([html.Th(h) for h in ("when", "rule", "state", "run", "layer", "value",
                                                                  "open the balance charts at")])),
                        html.Tbody(rows)], id="alerts-events-table", className="table")
    return fig, table


def series_figure(store, rule_key, run: str | None) -> go.Figure:
    if rule_key in (None, ""):
        return figures.empty_figure("pick a rule to see the series it evaluates", "Rule series")
    rule = alerts.get_rule(store, rule_key)
    if rule is None:
        return figures.empty_figure(f"no alert rule {rule_key!r}", "Rule series")
    run = rule["run"] or run
    if not run:
        return figures.empty_figure("pick a run: this rule watches every run", "Rule series")
    series = alerts.rule_series(store, rule, run)
    title = f"{rule['name']}: {rule['metric']} ({rule['aggregation']}) {rule['comparison']} {rule['threshold']:g} — {run}"
    fig = figures.step_lines({rule["metric"]: series}, "value", title=title, y_title=rule["metric"],
                             baseline=float(rule["threshold"]), baseline_label="threshold", uirevision=f"{rule['id']}|{run}")
    breach = series[series["holds"]]
    if not breach.empty:
        fig.add_trace(go.Scatter(x=breach["step"], y=breach["value"], mode="markers", name="condition holds",
                                 marker={"color": "#d62728", "size": 9},
                                 hovertemplate="step %{x}<br>value %{y:.4g}<extra>condition holds</extra>"))
    return fig


def _number(value):
    return None if value in (None, "") else value


def register(app: dash.Dash, ctx: common.Context) -> None:
    common.register_run_options(app, ctx, PREFIX)
    common.register_url_sync(app, PREFIX, PATH, {"runs": "alerts-runs", "rule": "alerts-rule"})

    @app.callback(Output("alerts-write-result", "children"), Output("alerts-changed", "data"),
                  Input("alerts-create", "n_clicks"), Input({"type": "alerts-delete", "index": ALL}, "n_clicks"),
                  State("alerts-token", "value"), State("alerts-new-name", "value"), State("alerts-new-metric", "value"),
                  State("alerts-new-comparison", "value"), State("alerts-new-threshold", "value"),
                  State("alerts-new-run", "value"), State("alerts-new-layer", "value"),
                  State("alerts-new-aggregation", "value"), State("alerts-new-window", "value"),
                  State("alerts-new-for", "value"), State("alerts-changed", "data"), prevent_initial_call=True)
    @common.guarded(lambda msg: (html.P(msg, className="problem"), dash.no_update))
    def write(_create, deletes, token, name, metric, comparison, threshold, run, layer, aggregation, window,
              for_evaluations, changed):
        trigger = dash.ctx.triggered_id
        if trigger is None or (trigger != "alerts-create" and not any(deletes or [])):
            return dash.no_update, dash.no_update  # a table redraw, not a click
        refused = write_refusal(ctx.settings, token)
        if refused:
            return html.P(refused, className="problem"), dash.no_update
        if trigger == "alerts-create":
            if threshold in (None, ""):
                raise ValueError("threshold must be a number")
            rule = alerts.add_rule(ctx.store, name=name or "", metric=metric, comparison=comparison,
                                   threshold=float(threshold), run=(run or "").strip() or None,
                                   layer=_number(layer), aggregation=aggregation,
                                   window_steps=_number(window) if aggregation == "window" else None,
                                   for_evaluations=int(for_evaluations or 1), settings=ctx.settings)
            return html.P(f"created rule {rule['id']} {rule['name']!r}", className="ok"), (changed or 0) + 1
        rule_id = trigger["index"]
        if not alerts.delete_rule(ctx.store, int(rule_id)):
            return html.P(f"no alert rule {rule_id}", className="problem"), (changed or 0) + 1
        return html.P(f"deleted rule {rule_id}", className="ok"), (changed or 0) + 1

    @app.callback(Output("alerts-rules", "children"), Output("alerts-rule", "options"),
                  Output("alerts-series", "figure"), Output("alerts-timeline", "figure"),
                  Output("alerts-events", "children"), Output("alerts-message", "children"),
                  Input("alerts-runs", "value"), Input("alerts-rule", "value"), Input("alerts-changed", "data"),
                  Input("refresh", "n_intervals"), State("alerts-problems", "data"), State("alerts-url-rule", "data"))
    @common.guarded(lambda msg: (None, [], figures.empty_figure(msg), figures.empty_figure(msg), None,
                                 common.message([msg])))
    def update(run, rule_key, _changed, _n, problems, url_rule):
        rules = alerts.list_rules(ctx.store)
        names = {r["id"]: r["name"] for r in rules}
        options = [{"label": f"{r['id']}: {r['name']}", "value": str(r["id"])} for r in rules]
        note = None
        if url_rule and not any(url_rule in (str(r["id"]), r["name"]) for r in rules):
            note = f"no alert rule {url_rule!r} (the link names a rule that was deleted or never existed)"
        if isinstance(rule_key, str) and not rule_key.isdigit():  # a rule named in the link: its id
            rule_key = next((str(r["id"]) for r in rules if r["name"] == rule_key), rule_key)
        key = None
        if rule_key not in (None, ""):
            key = alerts.rule_key(str(rule_key))
        series = series_figure(ctx.store, key, run)
        events = alerts.list_events(ctx.store, run=run or None, limit=500)
        timeline, table = events_view(events, names)
        progress = [evaluated(ctx.store, r, run) for r in rules] if run else None
        return rules_table(rules, progress), options, series, timeline, table, common.message(problems, note)
