"""Runs: every run with its health at a glance; pick several to overlay or compare."""
from __future__ import annotations

import time

import dash
from dash import Input, Output, State, dcc, html

from moescope.dashboard import state, summaries
from moescope.dashboard.pages import common

PATH, NAME, PREFIX = "/", "Runs", "runs"
HEADERS = {"run": "run", "status": "recording", "last_step": "last step", "maxvio": "MaxVio (last 50 steps)",
           "dead_experts": "dead experts", "drop_rate": "drop rate", "alerts_firing": "alerts firing",
           "collapse": "collapse verdict",
           "last_write": "last write", "routing_rows": "routing rows"}


def layout(**query) -> html.Div:
    view, problems = state.parse(query)
    return common.page(PREFIX, "Runs", "Every recorded run, its balance and alerts over its last 50 steps. "
                       "Tick runs to overlay them on the other pages.",
                       [html.Div([html.Label("Runs to overlay or compare", htmlFor="runs-select"),
                                  dcc.Checklist(id="runs-select", value=view.runs, options=[], className="checklist",
                                                inline=True)], className="picker wide"),
                        common.rank_picker(PREFIX, view.ranks)],
                       [html.Div(id="runs-links", className="links"), html.Div(id="runs-table-holder")],
                       problems, state.search(runs=view.runs, ranks=view.ranks), PATH)


def _ago(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.1f} days ago"


def _given(value) -> bool:
    return value is not None and value == value  # NaN: a column pandas filled for rows without the value


def cell(column: str, value, now: float, row=None):
    if not _given(value):
        return "—"
    if column == "collapse" and _given(getattr(row, "collapse_layer", None)):
        # An unhealthy verdict opens the first layer that has it on Router health, where its onset and evidence are.
        return dcc.Link(value, href=common.href("/health", state.search(runs=[row.run], layer=int(row.collapse_layer))),
                        className="collapse-link")
    if column == "alerts_firing" and value:  # what fires, and since which step, is on the Alerts page
        return dcc.Link(str(value), href=common.href("/alerts", state.search(runs=[row.run])), className="alerts-link")
    if column == "dead_experts":  # out of every layer's experts: 3 of 16 and 3 of 16,384 read differently
        total = getattr(row, "experts", None)
        return f"{int(value):,} of {int(total):,}" if _given(total) else f"{int(value):,}"
    if column == "run":
        return dcc.Link(value, href=common.href("/balance", state.search(runs=[value])))
    if column == "last_write":
        return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(value))} ({_ago(now - value)})"
    if column == "maxvio":
        return f"{value:.3f}"
    if column == "drop_rate":
        return f"{value:.2%}"
    if column == "routing_rows":
        return f"{int(value):,}"
    return str(value)


def register(app: dash.Dash, ctx: common.Context) -> None:
    common.register_url_sync(app, PREFIX, PATH, {"runs": "runs-select", "ranks": "runs-ranks"})
    common.register_rank_options(app, ctx, PREFIX, from_runs=False)

    @app.callback(Output("runs-table-holder", "children"), Output("runs-select", "options"),
                  Output("runs-message", "children"), Input("refresh-charts", "n_intervals"), Input("runs-problems", "data"),
                  Input("runs-ranks", "value"), State("runs-select", "value"))
    @common.guarded(lambda msg: (None, [], common.message([msg])))
    def refresh(_n, problems, ranks, selected):
        now = time.time()
        ranks, rank_note = common.rank_filter(ranks)
        health = summaries.runs_health(ctx.store, now=now, ranks=ranks)
        if health.empty:
            return html.P(common.NO_RUNS, className="empty"), [], common.message(problems)
        head = html.Thead(html.Tr([html.Th(h) for h in HEADERS.values()]))
        body = html.Tbody([html.Tr([html.Td(cell(c, getattr(r, c), now, r), className=f"col-{c}") for c in HEADERS],
                                   className=f"status-{r.status}") for r in health.itertuples()])
        caption = [html.Caption(f"balance of rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} only")] \
            if ranks else []
        table = html.Table(caption + [head, body], id="runs-table", className="table")
        options = [{"label": r, "value": r} for r in health["run"]]
        unknown = [r for r in selected or [] if r not in set(health["run"])]
        note = f"unknown run(s) {', '.join(repr(r) for r in unknown)} in the link" if unknown else None
        return table, options, common.message(problems, note, rank_note)

    @app.callback(Output("runs-links", "children"), Input("runs-select", "value"), Input("runs-ranks", "value"))
    def links(selected, ranks):
        selected = list(selected or [])
        if not selected:
            return html.P("Tick one or more runs to overlay them.", className="muted")
        search = state.search(runs=selected)
        balance = state.search(runs=selected, ranks=common.rank_filter(ranks)[0])  # the page that filters by rank
        parts = [html.Span(f"{len(selected)} selected: ", className="muted"),
                 dcc.Link("Balance", id="runs-open-balance", href=common.href("/balance", balance)), " · ",
                 dcc.Link("Router health", id="runs-open-health", href=common.href("/health", search)), " · ",
                 dcc.Link("Capacity what-if", href=common.href("/capacity", search)), " · ",
                 dcc.Link("Placement & cache what-if", href=common.href("/whatif", state.search(runs=selected[:1])))]
        if len(selected) >= 2:
            parts += [" · ", dcc.Link("Compare the first two", id="runs-open-compare",
                                      href=common.href("/compare", state.search(runs=selected[:2])))]
        return parts
