"""Specialisation: domain × expert against the uniform baseline k/E, each expert's top tokens as text,
the expert co-activation matrix, and consecutive-token repetition beside its random baseline."""
from __future__ import annotations

import dash
import numpy as np
import pandas as pd
from dash import Input, Output, State, html

from moescope.analysis import compute_metric
from moescope.dashboard import figures, state, summaries
from moescope.dashboard.pages import common

PATH, NAME, PREFIX = "/specialisation", "Specialisation", "spec"
TOP_TOKENS = 8


def layout(**query) -> html.Div:
    view, problems = state.parse(query)
    min_count = state.parse_int("min_count", query.get("min_count"), problems, lo=1, hi=10**9)
    controls = [common.run_picker(PREFIX, view.runs),
                common.checkpoint_picker(PREFIX, view.checkpoint), common.layer_input(PREFIX, view.layer),
                *common.step_inputs(PREFIX, view),
                common.number_input("spec-min-count", "Min token count", min_count, placeholder="5", minimum=1)]
    body = [common.graph("spec-domain"),
            html.Section(className="panel", children=[html.H3("Top tokens per expert"),
                                                       html.Div(id="spec-top-tokens")]),
            html.Div(className="row", children=[common.graph("spec-coactivation", className="half"),
                                                common.graph("spec-repetition", className="half")])]
    search = state.search(runs=view.runs[:1], checkpoint=view.checkpoint, layer=view.layer, step_min=view.step_min,
                          step_max=view.step_max, min_count=min_count)
    return common.page(PREFIX, "Specialisation", "What each expert is for. Domain shares are relative to uniform "
                       "routing (k/E: every expert equally likely); top tokens are the ids whose occurrences go to "
                       "the expert most often.", controls, body, problems, search, PATH)


def token_text(token_id: int, texts: dict[int, str]) -> str:
    """A token as the reader knows it: the text its tokenizer gave, quoted so spaces show; else its id."""
    text = texts.get(int(token_id))
    return repr(text) if text is not None else f"#{token_id}"


def top_ids(vocab: pd.DataFrame) -> pd.DataFrame:
    """Per expert, its TOP_TOKENS rows by share of their occurrences (ties: the more frequent id)."""
    return vocab.sort_values(["share", "tokens"], ascending=False, kind="stable").groupby("expert").head(TOP_TOKENS)


def top_tokens(vocab: pd.DataFrame, experts: int, texts: dict[int, str]) -> pd.DataFrame:
    """Per expert, its top tokens as text (token_text) with their shares."""
    rows = []
    top = top_ids(vocab)
    for expert in range(experts):
        part = top[top["expert"] == expert]
        text = "  ".join(f"{token_text(int(t), texts)} ({s:.0%})" for t, s in zip(part["token_id"], part["share"]))
        rows.append({"expert": expert, "tokens": text or NO_TOKENS})
    return pd.DataFrame(rows, columns=["expert", "tokens"])


NO_TOKENS = "— (no token routed here often enough)"


def top_token_rows(table: pd.DataFrame) -> list[html.Tr]:
    """A row per expert with top tokens, then one row for all the experts without (at 256 experts, most of them)."""
    empty = table["tokens"] == NO_TOKENS
    rows = [html.Tr([html.Td(r.expert), html.Td(r.tokens, className="tokens")]) for r in table[~empty].itertuples()]
    if empty.any():
        rows.append(html.Tr([html.Td(summaries.id_ranges(table.loc[empty, "expert"])),
                             html.Td(NO_TOKENS, className="tokens")]))
    return rows


def where(layer: int, checkpoint: str | None) -> str:
    return f"layer {layer}" + (f", checkpoint {checkpoint}" if checkpoint else "")


def register(app: dash.Dash, ctx: common.Context) -> None:
    common.register_run_options(app, ctx, PREFIX)
    common.register_checkpoint_options(app, ctx, PREFIX)
    common.register_url_sync(app, PREFIX, PATH, {"runs": "spec-runs", "checkpoint": "spec-checkpoint",
                                                 "layer": "spec-layer", "step_min": "spec-step-min",
                                                 "step_max": "spec-step-max", "min_count": "spec-min-count"})

    def empty(msg, problems=None):
        fig = figures.empty_figure(msg)
        return fig, html.P(msg, className="muted"), common.message(problems, msg)

    scope_inputs = [Input("spec-runs", "value"), Input("spec-checkpoint", "value"), Input("spec-layer", "value"),
                    Input("spec-step-min", "value"), Input("spec-step-max", "value")]

    def panel(output_id: str, draw) -> None:
        """A chart with its own callback: the slow per-token queries run side by side, none waits for another."""
        @app.callback(Output(output_id, "figure"), *scope_inputs)
        @common.guarded(figures.empty_figure)
        def update_panel(run, checkpoint, layer, step_min, step_max):
            if not run:
                return figures.empty_figure("pick a run")
            steps, layer_id, meta, _ = common.resolve(ctx.store, run, layer, step_min, step_max)
            if layer_id is None:
                return figures.empty_figure(figures.NO_DATA)
            return draw(run, checkpoint or None, layer_id, steps, meta)

    def repetition_figure(run, checkpoint, layer_id, steps, meta):
        rep = compute_metric(ctx.store, "repetition", run=run, layers=[layer_id], steps=steps, checkpoint=checkpoint,
                             by="window")
        return figures.grouped_bars(
            rep, "layer", {"top1_repeat": "top-1 repeated", "topk_overlap": "top-k overlap"},
            baselines={"top1_baseline": "random: 1/E", "topk_baseline": "random: 1 − C(E−k,k)/C(E,k)"},
            title=f"Adjacent tokens sharing experts — {where(layer_id, checkpoint)}", x_title="layer",
            y_title="share of adjacent pairs")

    def coactivation_figure(run, checkpoint, layer_id, steps, meta):
        E = int(meta.loc[meta["layer"] == layer_id, "E"].iloc[0])
        co = compute_metric(ctx.store, "coactivation", run=run, layers=[layer_id], steps=steps, checkpoint=checkpoint,
                            by="window")
        if co.empty:
            return figures.empty_figure(figures.NO_DATA, "Co-activation")
        grid = (co.pivot_table(index="expert_i", columns="expert_j", values="coactivation", aggfunc="sum")
                .reindex(index=range(E), columns=range(E)))
        return figures.matrix_heatmap(grid, title=f"Co-activation — {where(layer_id, checkpoint)}: P(j chosen | i chosen)",
                                      x_title="expert j", y_title="expert i", colour_title="P(j | i)",
                                      zrange=(0.0, 1.0), uirevision=f"{run}|{layer_id}")

    panel("spec-repetition", repetition_figure)
    panel("spec-coactivation", coactivation_figure)

    @app.callback(Output("spec-domain", "figure"), Output("spec-top-tokens", "children"),
                  Output("spec-message", "children"),
                  Input("spec-runs", "value"), Input("spec-checkpoint", "value"), Input("spec-layer", "value"),
                  Input("spec-step-min", "value"), Input("spec-step-max", "value"), Input("spec-min-count", "value"),
                  State("spec-problems", "data"))
    @common.guarded(empty)
    def update(run, checkpoint, layer, step_min, step_max, min_count, problems):
        if not run:
            return empty("pick a run", problems)
        with ctx.store.reading(run):  # one segment listing and one connection for the page's queries
            return draw(run, checkpoint, layer, step_min, step_max, min_count, problems)

    def draw(run, checkpoint, layer, step_min, step_max, min_count, problems):
        steps, layer_id, meta, notes = common.resolve(ctx.store, run, layer, step_min, step_max)
        if layer_id is None:
            return empty(figures.NO_DATA, problems)
        E, k = (int(v) for v in meta.loc[meta["layer"] == layer_id, ["E", "k"]].iloc[0])
        scope = dict(run=run, layers=[layer_id], steps=steps, checkpoint=checkpoint or None, by="window")
        here = where(layer_id, checkpoint)

        spec = compute_metric(ctx.store, "domain_specialisation", **scope)
        if spec.empty:
            domain = figures.empty_figure("no domain labels recorded for this scope", "Domain specialisation")
        else:
            grid = spec.pivot_table(index="domain", columns="expert", values="share", aggfunc="sum")
            tokens = spec.groupby("domain")["tokens"].max().reindex(grid.index)
            hover = np.array([[f"share {s:.3f} of {int(n)} tokens" for s in row]
                              for row, n in zip(grid.to_numpy(), tokens)])
            ratio = grid / (k / E)
            domain = figures.matrix_heatmap(ratio, title=f"Domain specialisation — {here} "
                                            f"(share ÷ uniform k/E = {k / E:.3f})", x_title="expert",
                                            y_title="domain", colour_title="× uniform", uirevision=f"{run}|{layer_id}",
                                            hover_extra=hover, **figures.over_uniform_scale(ratio))

        count = int(min_count) if min_count not in (None, "") and int(min_count) >= 1 else 5
        vocab = compute_metric(ctx.store, "vocab_specialisation", **scope, min_count=count, top=TOP_TOKENS)
        if vocab.empty:
            tops = html.P(f"no token seen at least {count} times in this scope; lower the minimum count",
                          className="muted")
        else:
            texts = ctx.store.token_texts(run, top_ids(vocab)["token_id"])
            table = top_tokens(vocab, E, texts)
            tops = html.Table([html.Thead(html.Tr([html.Th("expert"), html.Th(
                "top tokens (share of their occurrences routed here)" + ("" if texts else
                ", as token ids: the run recorded no token text (attach(..., tokenizer=...) records it)"))])),
                html.Tbody(top_token_rows(table))], id="spec-top-tokens-table", className="table")

        return domain, tops, common.message(problems, *notes)
