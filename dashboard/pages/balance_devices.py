"""The Balance page's per-device charts: tokens per device over steps (the first picked run) and
balancedness over steps (runs overlaid), under each run's recorded expert -> device map."""
from __future__ import annotations

import dash
import pandas as pd
from dash import Input, Output, html

from moescope.analysis import compute_metric
from moescope.dashboard import figures, summaries
from moescope.dashboard.pages import common

TOKENS, BALANCE = "balance-device-tokens", "balance-device-balancedness"
# Where a run has no map, the panels say how to record one (and where placements are replayed without one).
NO_MAP = ("no expert → device map recorded for this scope<br>record one with attach(model, ep_size=N) or "
          "expert_devices=…;<br>Placement & cache replays placements without one")


def row() -> html.Div:
    return html.Div(className="row", children=[common.graph(TOKENS, className="half"),
                                               common.graph(BALANCE, className="half")])


def device_load(store, run: str, layer: int | None, steps, ranks) -> pd.DataFrame | None:
    """The run's per-device load (the layer's, or all layers summed); None when it has no map for that scope."""
    try:
        return compute_metric(store, "device_load", run=run, layers=None if layer is None else [layer], steps=steps,
                              phase=summaries.series_phase(store, run), ranks=ranks, combine_layers=layer is None)
    except ValueError:
        return None  # no map (or none for this layer): the charts say there is no data for this scope


def figures_for(store, runs: list[str], layer: int | None, steps, ranks, smoothing: float) -> list:
    where = f"layer {layer}" if layer is not None else "all layers"
    loads = {run: device_load(store, run, layer, steps, ranks) for run in runs}
    first = loads[runs[0]]
    tokens_title = f"Tokens per device — {runs[0]}, {where}"
    if first is None:
        tokens = figures.empty_figure(NO_MAP, f"Tokens per device — {where}")
    else:
        tokens = figures.step_lines({f"device {d}": df[["step", "tokens"]] for d, df in first.groupby("device")},
                                    "tokens", title=tokens_title, y_title="tokens (assignments)", smoothing=smoothing,
                                    uirevision=f"{runs[0]}|{layer}")
    have = {run: df.drop_duplicates("step")[["step", "balancedness"]] for run, df in loads.items() if df is not None}
    balance_title = f"Device balancedness (mean / max tokens per device) — {where}"
    if not have:
        balance = figures.empty_figure(NO_MAP, f"Device balancedness — {where}")
    else:
        balance = figures.step_lines(have, "balancedness", title=balance_title, y_title="balancedness (1 = balanced)",
                                     smoothing=smoothing, uirevision=f"{','.join(runs)}|{layer}", baseline=1.0,
                                     baseline_label="balanced")
    return [tokens, balance]


def register(app: dash.Dash, ctx: common.Context) -> None:
    def empty(msg, problems=None):
        return [figures.empty_figure(msg)] * 2

    @app.callback([Output(TOKENS, "figure"), Output(BALANCE, "figure")], Input("balance-runs", "value"),
                  Input("balance-layer", "value"), Input("balance-step-min", "value"), Input("balance-step-max", "value"),
                  Input("balance-smoothing", "value"), Input("refresh-charts", "n_intervals"), Input("balance-ranks", "value"))
    @common.guarded(empty)
    def update_devices(runs, layer, step_min, step_max, smoothing, _n, ranks):
        runs = [r for r in (runs or []) if r]
        if not runs:
            return empty("pick one or more runs")
        for run in runs:
            ctx.store.require_run(run)
        steps, _ = common.window(step_min, step_max)  # the page's message already names bad inputs
        weight, _ = common.smoothing_weight(smoothing)
        ranks, _ = common.rank_filter(ranks)
        layer_id = None if layer in (None, "") else common.pick_layer(ctx.store, runs[0], layer)[0]
        return figures_for(ctx.store, runs, layer_id, steps, ranks, weight)
