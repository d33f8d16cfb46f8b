"""Compare two runs or checkpoints (model versions) on the same probe tokens: expert alignment by
Hungarian matching, load and domain specialisation side by side after alignment, routing agreement."""
from __future__ import annotations

import dash
import pandas as pd
from dash import Input, Output, State, dcc, html

from moescope.analysis import compute_metric, drift
from moescope.dashboard import figures, state
from moescope.dashboard.pages import common

PATH, NAME, PREFIX = "/compare", "Compare", "cmp"


def layout(**query) -> html.Div:
    view, problems = state.parse(query)
    probe_set = state.first_value(query.get("probe_set"))
    run_b = view.runs[1] if len(view.runs) > 1 else None
    controls = [common.run_picker(PREFIX, view.runs[:1]),
                common.checkpoint_picker(PREFIX, view.checkpoint, label="Checkpoint A",
                                         placeholder="final replay (first, when B is this run)"),
                common.labelled("Run B", dcc.Dropdown(id="cmp-run-b", value=run_b, clearable=True,
                                                      options=[run_b] if run_b else [], placeholder="same run"),
                                "cmp-run-b"),
                common.labelled("Checkpoint B", dcc.Dropdown(id="cmp-checkpoint-b", value=view.checkpoint_b,
                                                             clearable=True, placeholder="final replay",
                                                             options=[view.checkpoint_b] if view.checkpoint_b else []),
                                "cmp-checkpoint-b"),
                common.labelled("Probe set", dcc.Dropdown(id="cmp-probe-set", value=probe_set, clearable=True,
                                                          options=[probe_set] if probe_set else [],
                                                          placeholder="the only one replayed"), "cmp-probe-set"),
                common.layer_input(PREFIX, view.layer)]
    body = [html.Div(className="row", children=[common.graph("cmp-agreement", className="half"),
                                                common.graph("cmp-load", className="half")]),
            html.Div(className="row", children=[common.graph("cmp-domain-a", className="half"),
                                                common.graph("cmp-domain-b", className="half")]),
            html.Section(className="panel", children=[html.H3("Expert alignment"), html.Div(id="cmp-alignment")]),
            dcc.Store(id="cmp-both-runs", data=view.runs[:2])]
    search = state.search(runs=view.runs[:2], checkpoint=view.checkpoint, checkpoint_b=view.checkpoint_b,
                          probe_set=probe_set, layer=view.layer)
    return common.page(PREFIX, "Compare", "Two model versions routing the same probe tokens. Experts need not share "
                       "ids, so B's experts are matched to A's (Hungarian matching on co-assigned tokens) before "
                       "anything is drawn side by side.", controls, body, problems, search, PATH)


def register(app: dash.Dash, ctx: common.Context) -> None:
    common.register_run_options(app, ctx, PREFIX)
    common.register_checkpoint_options(app, ctx, PREFIX)
    common.register_url_sync(app, PREFIX, PATH, {"runs": "cmp-both-runs.data", "checkpoint": "cmp-checkpoint",
                                                 "checkpoint_b": "cmp-checkpoint-b", "probe_set": "cmp-probe-set",
                                                 "layer": "cmp-layer"})

    @app.callback(Output("cmp-both-runs", "data"), Input("cmp-runs", "value"), Input("cmp-run-b", "value"))
    def both_runs(run_a, run_b):
        return [r for r in (run_a, run_b) if r]

    @app.callback(Output("cmp-run-b", "options"), Output("cmp-checkpoint-b", "options"), Output("cmp-probe-set", "options"),
                  Input("cmp-runs", "value"), Input("cmp-run-b", "value"), Input("refresh", "n_intervals"))
    @common.guarded(lambda msg: ([], [], []))
    def options(run_a, run_b, _n):
        runs = common.known_runs(ctx.store)
        other = run_b if run_b in runs else run_a
        checkpoints = list(ctx.store.checkpoints(other)["checkpoint"]) if other in runs else []
        probe_sets = drift.replayed_probe_sets(ctx.store, run_a) if run_a in runs else []
        return list(reversed(runs)), checkpoints, probe_sets

    charts = ["cmp-agreement", "cmp-load", "cmp-domain-a", "cmp-domain-b"]

    def empty(msg, problems=None):
        fig = figures.empty_figure(msg)
        return [fig] * len(charts) + [None, common.message(problems, msg)]

    @app.callback([Output(c, "figure") for c in charts] + [Output("cmp-alignment", "children"),
                                                           Output("cmp-message", "children")],
                  Input("cmp-runs", "value"), Input("cmp-checkpoint", "value"), Input("cmp-run-b", "value"),
                  Input("cmp-checkpoint-b", "value"), Input("cmp-probe-set", "value"), Input("cmp-layer", "value"),
                  State("cmp-problems", "data"))
    @common.guarded(empty)
    def update(run_a, ckpt_a, run_b, ckpt_b, probe_set, layer, problems):
        if not run_a:
            return empty("pick run A", problems)
        run_b = run_b or run_a
        ctx.store.require_run(run_b)
        _, layer_id, meta, notes = common.resolve(ctx.store, run_a, layer, None, None)
        ps = drift.resolve_probe_set(ctx.store, run_a, probe_set or None)
        replayed_a = drift.replayed_checkpoints(ctx.store, run_a, ps).checkpoint
        # One run alone: its first replayed checkpoint against its last, so the page opens on a comparison.
        a = ckpt_a or (replayed_a.iloc[0] if run_b == run_a and not ckpt_b else replayed_a.iloc[-1])
        b = ckpt_b or drift.replayed_checkpoints(ctx.store, run_b, ps).checkpoint.iloc[-1]
        if run_a == run_b and a == b:
            notes.append(f"A and B are the same checkpoint ({a} of {run_a}): pick another checkpoint or run for B")
        E, k = (int(v) for v in meta.loc[meta["layer"] == layer_id, ["E", "k"]].iloc[0])
        align = compute_metric(ctx.store, "alignment", run=run_a, run_b=run_b, checkpoint_a=a, checkpoint_b=b,
                               probe_set=ps)
        per_layer = align.groupby("layer", as_index=False)[["agreement", "baseline"]].first()
        agreement = figures.grouped_bars(per_layer, "layer", {"agreement": "tokens on matched experts"},
                                         baselines={"baseline": "random routing (1/E)"},
                                         title=f"Routing agreement: {run_a}@{a} vs {run_b}@{b} ({ps})",
                                         x_title="layer", y_title="share of shared probe tokens")
        mine = align[align["layer"] == layer_id].sort_values("expert_a")
        order_b = [int(x) for x in mine["expert_b"]]
        load_a = compute_metric(ctx.store, "load_share", run=run_a, layers=[layer_id], checkpoint=a, by="window")
        load_b = compute_metric(ctx.store, "load_share", run=run_b, layers=[layer_id], checkpoint=b, by="window")
        share_b = load_b.set_index("expert")["share"]
        side = pd.DataFrame({"expert": mine["expert_a"].astype(int),
                             "a": load_a.set_index("expert")["share"].reindex(mine["expert_a"]).to_numpy(),
                             "b": share_b.reindex(order_b).to_numpy()})
        load = figures.grouped_bars(side, "expert", {"a": f"A: {run_a}@{a}", "b": f"B: {run_b}@{b} (matched expert)"},
                                    title=f"Load share after alignment — layer {layer_id} (uniform {1 / E:.3f})",
                                    x_title="expert of A", y_title="load share")
        grid_a = common.domain_grid(ctx.store, run_a, layer_id, a, k / E, list(mine["expert_a"].astype(int)))
        grid_b = common.domain_grid(ctx.store, run_b, layer_id, b, k / E, order_b)
        scale = figures.over_uniform_scale(grid_a, grid_b)  # one colour range: A and B compare by colour
        dom_a = common.domain_figure(grid_a, f"Domains — A: {run_a}@{a}, layer {layer_id}", scale,
                                     x_title="expert of A")
        dom_b = common.domain_figure(grid_b, f"Domains — B: {run_b}@{b}, matched to A's experts", scale,
                                     x_title="expert of B (in A's order)")
        table = html.Table([html.Thead(html.Tr([html.Th(h) for h in ("expert of A", "matched expert of B",
                                                                       "co-assigned tokens", "tokens of A's expert")])),
                            html.Tbody([html.Tr([html.Td(int(r.expert_a)), html.Td(int(r.expert_b)),
                                                 html.Td(int(r.co_assigned)), html.Td(int(r.tokens_a))])
                                        for r in mine.itertuples()])], id="cmp-alignment-table", className="table")
        return [agreement, load, dom_a, dom_b, table, common.message(problems, *notes)]
