"""What every page shares: the controls that carry the URL state, the run pickers, message areas,
and the guard that turns bad input into a line in the page instead of a traceback."""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import dash
import pandas as pd
from dash import ClientsideFunction, Input, Output, State, dcc, html

from moescope.analysis import compute_metric
from moescope.analysis.query import layer_meta, run_ranks
from moescope.collector.store import Store, StoreError
from moescope.dashboard import figures, state
from moescope.settings import Settings

log = logging.getLogger(__name__)
GRAPH_CONFIG = {"displaylogo": False}
NO_RUNS = "No runs recorded yet — run `moescope demo` to record one, or attach the probe to your model."


@dataclass(frozen=True)
class Context:
    """What page callbacks need: the store they read and the service settings (API token)."""

    store: Store
    settings: Settings


def href(path: str, search: str = "") -> str:
    """A link inside the dashboard, under its mount prefix."""
    return dash.get_relative_path(path) + search


def graph(graph_id: str, **kw) -> dcc.Graph:
    return dcc.Graph(id=graph_id, config=GRAPH_CONFIG, figure=figures.empty_figure("loading…"), **kw)


def labelled(label: str, control, control_id: str, class_name: str = "picker") -> html.Div:
    return html.Div([html.Label(label, htmlFor=control_id), control], className=class_name)


def run_picker(prefix: str, runs: list[str], *, multi: bool = False) -> html.Div:
    value = runs if multi else (runs[0] if runs else None)
    return labelled("Runs (overlay)" if multi else "Run", dcc.Dropdown(
        id=f"{prefix}-runs", multi=multi, clearable=multi, value=value, options=[{"label": r, "value": r} for r in runs],
        placeholder="pick runs" if multi else "pick a run"), f"{prefix}-runs", "picker wide" if multi else "picker")


def checkpoint_picker(prefix: str, value: str | None, *, suffix: str = "checkpoint", label: str = "Checkpoint",
                      placeholder: str = "all checkpoints") -> html.Div:
    cid = f"{prefix}-{suffix}"
    return labelled(label, dcc.Dropdown(id=cid, value=value, clearable=True, placeholder=placeholder,
                                        options=[{"label": value, "value": value}] if value else []), cid)


def rank_picker(prefix: str, ranks: list[int]) -> html.Div:
    """A multi-select of ranks (empty: every rank, summed); its options are the picked runs' ranks."""
    cid = f"{prefix}-ranks"
    return html.Div([html.Label("Ranks", htmlFor=cid),
                     dcc.Dropdown(id=cid, multi=True, value=list(ranks), placeholder="all ranks",
                                  options=[{"label": str(r), "value": r} for r in ranks]),
                     html.Div(id=f"{prefix}-rank-note", className="message")], className="picker")


def number_input(cid: str, label: str, value, *, placeholder: str, minimum=None, maximum=None, step=1) -> html.Div:
    return labelled(label, dcc.Input(id=cid, type="number", value=value, min=minimum, max=maximum, step=step,
                                     debounce=True, placeholder=placeholder, className="number"), cid, "picker narrow")


def layer_input(prefix: str, value: int | None, placeholder: str = "first layer") -> html.Div:
    return number_input(f"{prefix}-layer", "Layer", value, placeholder=placeholder, minimum=0)


def step_inputs(prefix: str, view: state.ViewState) -> list[html.Div]:
    return [number_input(f"{prefix}-step-min", "From step", view.step_min, placeholder="first"),
            number_input(f"{prefix}-step-max", "To step", view.step_max, placeholder="last")]


def smoothing_input(prefix: str, value: float) -> html.Div:
    return number_input(f"{prefix}-smoothing", "Smoothing (EMA weight)", value or None, placeholder="0 = off",
                        minimum=0, maximum=state.SMOOTHING_MAX, step=0.05)


def page(prefix: str, title: str, intro: str, controls: list, body: list, problems: list[str], search: str,
         path: str) -> html.Div:
    """A page: title, controls, a message line (URL problems first), a link to this view, the body."""
    return html.Div(className="view", id=f"{prefix}-page", children=[
        html.H2(title), html.P(intro, className="intro"),
        html.Div(controls, className="controls"),
        dcc.Store(id=f"{prefix}-problems", data=problems),
        html.Div(id=f"{prefix}-run-note", className="message"),
        html.Div(id=f"{prefix}-message", className="message", children=problem_lines(problems)),
        html.Div(className="share", children=[
            html.A("link to this view", id=f"{prefix}-share", href=href(path, search)),
            dcc.Store(id=f"{prefix}-search", data=search), dcc.Store(id=f"{prefix}-synced")]),
        html.Div(body, id=f"{prefix}-body"),
    ])


def problem_lines(problems: list[str]) -> list:
    return [html.P(p, className="problem") for p in problems if p]


def message(problems: list[str] | None, *more: str | None) -> list:
    return problem_lines(list(problems or []) + [m for m in more if m])


def guarded(empty):
    """Wrap a callback: bad input or a vanished run becomes `empty(message)`, never a traceback.

    Anything unexpected is logged with its traceback on the server and named in one line.
    """
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (StoreError, ValueError) as exc:
                return empty(str(exc).splitlines()[0])
            except Exception as exc:  # the page must stay usable whatever a query does
                log.exception("dashboard callback %s failed", fn.__name__)
                return empty(f"could not compute this view: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        return inner
    return wrap


def known_runs(store: Store) -> list[str]:
    return list(store.runs()["run"])


def register_run_options(app: dash.Dash, ctx: Context, prefix: str, *, multi: bool = False) -> None:
    """Fill the run picker from the store on every refresh; URL runs the store lacks are named, not shown."""
    @app.callback(Output(f"{prefix}-runs", "options"), Output(f"{prefix}-runs", "value"),
                  Output(f"{prefix}-run-note", "children"),
                  Input("refresh", "n_intervals"), State(f"{prefix}-runs", "value"))
    def fill_runs(_n, current):
        names = known_runs(ctx.store)
        options = [{"label": r, "value": r} for r in reversed(names)]  # newest first
        if not names:
            return [], None, NO_RUNS
        chosen = [current] if isinstance(current, str) else list(current or [])
        unknown = [r for r in chosen if r not in names]
        note = (f"unknown run(s) {', '.join(repr(r) for r in unknown)}; recorded runs include "
                f"{', '.join(list(reversed(names))[:5])}") if unknown else None
        kept = [r for r in chosen if r in names]
        if not chosen:
            kept = [names[-1]]  # default: the newest run
        elif kept == chosen:
            return options, dash.no_update, None
        value = kept if multi else (kept[0] if kept else None)
        return options, value, note


def register_rank_options(app: dash.Dash, ctx: Context, prefix: str, *, from_runs: bool = True) -> None:
    """Fill the rank picker with the ranks of the picked runs (of every run when from_runs is False);
    ranks from the URL that none of them recorded are named, not kept."""
    inputs = [Input(f"{prefix}-runs", "value")] if from_runs else []

    @app.callback(Output(f"{prefix}-ranks", "options"), Output(f"{prefix}-ranks", "value"),
                  Output(f"{prefix}-rank-note", "children"), *inputs, Input("refresh", "n_intervals"),
                  State(f"{prefix}-ranks", "value"))
    def fill_ranks(*args):
        runs, current = (args[0], args[-1]) if from_runs else (None, args[-1])
        names = ([runs] if isinstance(runs, str) else list(runs or [])) if from_runs else known_runs(ctx.store)
        seen: set[int] = set()
        for run in names:
            try:
                seen.update(run_ranks(ctx.store, run))
            except StoreError:
                continue  # an unknown run is named by the run picker
        wanted, _ = rank_filter(current)
        kept = [r for r in wanted or [] if r in seen]
        missing = [r for r in wanted or [] if r not in seen]
        note = f"no rank {', '.join(map(str, missing))} in the picked runs; ranks {', '.join(map(str, sorted(seen)))}" \
            if missing and seen else None
        return ([{"label": str(r), "value": r} for r in sorted(seen)], dash.no_update if kept == (wanted or []) else kept,
                note)


def rank_filter(value) -> tuple[list[int] | None, str | None]:
    """The picked ranks for compute_metric (None: every rank), checked like the URL, and a note on bad ones."""
    problems: list[str] = []
    ranks = state.parse_ranks([str(v) for v in value] if isinstance(value, (list, tuple)) else value, problems)
    return (ranks or None), "; ".join(problems) or None


def register_checkpoint_options(app: dash.Dash, ctx: Context, prefix: str, suffix: str = "checkpoint") -> None:
    @app.callback(Output(f"{prefix}-{suffix}", "options"), Output(f"{prefix}-{suffix}", "value"),
                  Input(f"{prefix}-runs", "value"), Input("refresh", "n_intervals"), State(f"{prefix}-{suffix}", "value"))
    def fill_checkpoints(runs, _n, current):
        # The refresh input also keeps this callback in Dash's first round when the run picker's own
        # callback leaves its value unchanged (a callback fed only by no_update outputs never runs).
        run = first_run(runs)
        if not run:
            return [], None
        try:
            ckpts = ctx.store.checkpoints(run)
        except StoreError:
            return [], None
        names = list(ckpts["checkpoint"])
        options = [{"label": f"{c} (step {int(s)})" if pd.notna(s) else c, "value": c}
                   for c, s in zip(ckpts["checkpoint"], ckpts["step"])]
        return options, (current if current in names else None)


def register_url_sync(app: dash.Dash, prefix: str, path: str, controls: dict[str, str]) -> None:
    """Write the controls' values into the page URL (history.replaceState) and its share link.

    controls maps a query key to the id of the control whose `value` it carries ("id.prop" for another property).
    """
    keys = list(controls)
    inputs = [Input(*cid.split(".", 1)) if "." in cid else Input(cid, "value") for cid in controls.values()]

    @app.callback(Output(f"{prefix}-search", "data"), Output(f"{prefix}-share", "href"), inputs)
    def to_url(*values):
        search = state.search(**dict(zip(keys, values)))
        return search, href(path, search)

    app.clientside_callback(ClientsideFunction(namespace="moescope", function_name="syncUrl"),
                            Output(f"{prefix}-synced", "data"), Input(f"{prefix}-search", "data"))


def first_run(runs) -> str | None:
    if isinstance(runs, (list, tuple)):
        return runs[0] if runs else None
    return runs or None


def run_layers(store: Store, run: str) -> pd.DataFrame:
    """layer, E, k of every layer of the run (registered, or seen in the data)."""
    return layer_meta(store, run)


def pick_layer(store: Store, run: str, layer) -> tuple[int | None, pd.DataFrame, str | None]:
    """The layer to show (the requested one, else the first), the run's layers, and a note when the request was off."""
    meta = run_layers(store, run)
    if meta.empty:
        return None, meta, None
    layers = [int(x) for x in meta.layer]
    if layer is None or layer == "":
        return layers[0], meta, None
    try:
        wanted = int(layer)
    except (TypeError, ValueError):
        return layers[0], meta, f"layer {layer!r} is not an integer; showing layer {layers[0]}"
    if wanted not in layers:
        return layers[0], meta, (f"run {run!r} has no layer {wanted} (layers {layers[0]}–{layers[-1]}); "
                                 f"showing layer {layers[0]}")
    return wanted, meta, None


def window(step_min, step_max) -> tuple[tuple[int, int] | None, str | None]:
    """The step window from the two inputs, checked like the URL (huge or reversed windows: a note)."""
    problems: list[str] = []
    lo = state.parse_int("step_min", step_min, problems)
    hi = state.parse_int("step_max", step_max, problems)
    if lo is not None and hi is not None and lo > hi:
        return None, f"the step window {lo}..{hi} is reversed; showing every step"
    view = state.ViewState(step_min=lo, step_max=hi)
    return view.steps, "; ".join(problems) or None


def smoothing_weight(value) -> tuple[float, str | None]:
    problems: list[str] = []
    weight = state.parse_smoothing(value, problems)
    return weight, "; ".join(problems) or None


def register_drill_down(app: dash.Dash, heatmap_id: str, layer_input_id: str) -> None:
    """A click on a layer × step heatmap's row picks that layer."""
    @app.callback(Output(layer_input_id, "value"), Input(heatmap_id, "clickData"), prevent_initial_call=True)
    def drill_down(click):
        try:
            return int(click["points"][0]["y"])
        except (TypeError, KeyError, IndexError, ValueError):
            return dash.no_update


def resolve(store: Store, run: str, layer, step_min, step_max) -> tuple[tuple[int, int] | None, int | None,
                                                                       pd.DataFrame, list[str | None]]:
    """A single-run page's scope: the step window, the layer to show, the run's layers, and notes on the input."""
    store.require_run(run)
    steps, step_note = window(step_min, step_max)
    layer_id, meta, layer_note = pick_layer(store, run, layer)
    return steps, layer_id, meta, [step_note, layer_note]


def domain_grid(store: Store, run: str, layer: int, checkpoint: str, uniform: float,
                order: list[int] | None = None) -> pd.DataFrame | None:
    """Domain × expert shares ÷ the uniform share at one checkpoint (experts in `order` when given); None without
    domain labels. Drift and Compare set two of these side by side."""
    spec = compute_metric(store, "domain_specialisation", run=run, layers=[layer], checkpoint=checkpoint, by="window")
    if spec.empty:
        return None
    grid = spec.pivot_table(index="domain", columns="expert", values="share", aggfunc="sum")
    return (grid if order is None else grid.reindex(columns=order)) / uniform


def domain_figure(grid: pd.DataFrame | None, title: str, scale: dict, *, x_title: str = "expert",
                  uirevision: str = ""):
    """A domain_grid's heatmap on `scale` (figures.over_uniform_scale of the grids drawn together)."""
    if grid is None:
        return figures.empty_figure("no domain labels recorded for this checkpoint", title)
    return figures.matrix_heatmap(grid, title=title, x_title=x_title, y_title="domain", colour_title="× uniform",
                                  uirevision=uirevision, **scale)
