"""Placement and hot-expert cache what-if: the recorded traffic of one layer replayed on expert placements
over EP devices (balancedness per step, tokens and all-to-all bytes per device, the suggested map fitted on
one window and judged on another), and the coverage and LRU / LFU hit rates of a cache of N experts."""
from __future__ import annotations

import math

import dash
import pandas as pd
from dash import Input, Output, State, dcc, html

from moescope.analysis import compute_metric
from moescope.analysis.placement import LOAD_AWARE, POLICIES, SUGGEST_GAIN
from moescope.dashboard import figures, state
from moescope.dashboard.pages import common

PATH, NAME, PREFIX = "/whatif", "Placement & cache", "wi"
DEFAULT_POLICIES = ["contiguous", "round_robin", "eplb", "eplb_global", "coactivation"]
# Any other policy the library has can be picked; an explicit map is for the API and the CLI.
SHOWN_POLICIES = DEFAULT_POLICIES + [p for p in POLICIES if p not in DEFAULT_POLICIES and p != "map"]
DTYPES = ("bfloat16", "float16", "float32", "float8", "int8")
MAX_CACHE_SIZES = 16
LIMITS = {"ep_size": (1, 4096), "gpus_per_node": (1, 4096), "redundant": (0, 1 << 16), "hidden_size": (1, 1 << 20)}
# URL key -> control id; the step windows use the common step ids so they read like every other page's.
CONTROLS = {"runs": "wi-runs", "layer": "wi-layer", "step_min": "wi-step-min", "step_max": "wi-step-max",
            "fit_min": "wi-fit-min", "fit_max": "wi-fit-max", "ep_size": "wi-ep-size", "gpus_per_node": "wi-gpus",
            "redundant": "wi-redundant", "policies": "wi-policies", "hidden_size": "wi-hidden", "dtype": "wi-dtype",
            "cache_sizes": "wi-cache-sizes"}


def parse_policies(value, problems: list[str]) -> list[str]:
    """'eplb,coactivation' (or a list) -> those policies; unknown names are named in problems; none: all of them."""
    values = value if isinstance(value, (list, tuple)) else [value]
    picked = []
    for part in (p.strip() for v in values if v not in (None, "") for p in str(v).split(",")):
        if part in SHOWN_POLICIES:
            picked.append(part)
        elif part:
            problems.append(f"ignored policy {part[:40]!r}: policies are {', '.join(SHOWN_POLICIES)}")
    return list(dict.fromkeys(picked))


def parse_cache_sizes(text, experts: int) -> tuple[list[int], str | None]:
    """'1, 2, 8' -> [1, 2, 8]; the default (powers of two up to E, and E) and a note when the text is not that."""
    default = sorted({2 ** i for i in range(experts.bit_length()) if 2 ** i <= experts} | {experts})
    if text in (None, ""):
        return default, None
    try:
        sizes = sorted({int(p) for p in str(text).replace(";", ",").split(",") if p.strip()})
    except ValueError:
        return default, f"ignored cache sizes {str(text)[:60]!r}: not a comma-separated list of whole numbers"
    if not sizes or len(sizes) > MAX_CACHE_SIZES or not all(1 <= s <= experts for s in sizes):
        return default, (f"ignored cache sizes {str(text)[:60]!r}: give 1 to {MAX_CACHE_SIZES} whole numbers "
                         f"between 1 and the layer's {experts} experts")
    return sizes, None


def fit_window(fit_min, fit_max) -> tuple[tuple[int, int] | None, str | None]:
    """The fit window from its two inputs (None: fit on the evaluated window) and a note when they are off."""
    problems: list[str] = []
    lo, hi = (state.parse_int(name, v, problems) for name, v in (("fit_min", fit_min), ("fit_max", fit_max)))
    if lo is not None and hi is not None and lo > hi:
        return None, f"the fit window {lo}..{hi} is reversed; fitting on the evaluated window"
    return state.ViewState(step_min=lo, step_max=hi).steps, "; ".join(problems) or None


def checked(name: str, value, problems: list[str]) -> int | None:
    lo, hi = LIMITS[name]
    return state.parse_int(name, value, problems, lo=lo, hi=hi)


def layout(**query) -> html.Div:
    view, problems = state.parse(query)
    fit_min = state.parse_int("fit_min", query.get("fit_min"), problems)
    fit_max = state.parse_int("fit_max", query.get("fit_max"), problems)
    knobs = {name: checked(name, query.get(name), problems) for name in LIMITS}
    policies = parse_policies(query.get("policies"), problems) or list(DEFAULT_POLICIES)
    dtype = state.first_value(query.get("dtype")) or "bfloat16"
    if dtype not in DTYPES:
        problems.append(f"ignored dtype={dtype[:40]!r}: dtypes are {', '.join(DTYPES)}")
        dtype = "bfloat16"
    cache_sizes = state.first_value(query.get("cache_sizes"))  # checked by the callback against the layer's E
    number = common.number_input
    controls = [
        common.run_picker(PREFIX, view.runs), common.layer_input(PREFIX, view.layer),
        number("wi-step-min", "Evaluate from step", view.step_min, placeholder="first"),
        number("wi-step-max", "Evaluate to step", view.step_max, placeholder="last"),
        number("wi-fit-min", "Fit from step", fit_min, placeholder="= evaluated"),
        number("wi-fit-max", "Fit to step", fit_max, placeholder="= evaluated"),
        number("wi-ep-size", "EP size (devices)", knobs["ep_size"], placeholder="auto", minimum=1),
        number("wi-gpus", "GPUs per node", knobs["gpus_per_node"], placeholder="all: one node", minimum=1),
        number("wi-redundant", "Redundant slots", knobs["redundant"], placeholder="0", minimum=0),
        common.labelled("Policies", dcc.Dropdown(id="wi-policies", multi=True, value=policies, placeholder="pick policies",
                                                 options=[{"label": p, "value": p} for p in SHOWN_POLICIES]),
                        "wi-policies", "picker wide"),
        number("wi-hidden", "Hidden size", knobs["hidden_size"], placeholder="none: copies", minimum=1),
        common.labelled("dtype", dcc.Dropdown(id="wi-dtype", value=dtype, clearable=False,
                                              options=[{"label": d, "value": d} for d in DTYPES]), "wi-dtype"),
        common.labelled("Cache sizes N", dcc.Input(id="wi-cache-sizes", type="text", value=cache_sizes, debounce=True,
                                                   placeholder="1, 2, 4, … E"), "wi-cache-sizes"),
    ]
    body = [
        html.Section(className="panel", children=[
            html.H3("Expert placement over EP devices"), html.Div(id="wi-placement-message", className="message"),
            html.Div(className="row", children=[common.graph("wi-balancedness", className="half"),
                                                common.graph("wi-device-tokens", className="half")]),
            html.Div(className="row", children=[common.graph("wi-device-bytes", className="half")]),
            html.Div(id="wi-summary")]),
        html.Section(className="panel", children=[
            html.H3("Hot-expert cache"), html.Div(id="wi-cache-message", className="message"),
            common.graph("wi-cache-curve"), html.Div(id="wi-cache-table")]),
    ]
    search = state.search(runs=view.runs[:1], layer=view.layer, step_min=view.step_min, step_max=view.step_max,
                          fit_min=fit_min, fit_max=fit_max, ep_size=knobs["ep_size"],
                          gpus_per_node=knobs["gpus_per_node"], redundant=knobs["redundant"],
                          policies=None if policies == DEFAULT_POLICIES else policies,
                          hidden_size=knobs["hidden_size"], dtype=None if dtype == "bfloat16" else dtype,
                          cache_sizes=cache_sizes)
    return common.page(PREFIX, "Placement & cache what-if", "The recorded traffic of one layer replayed on other "
                       "expert placements and on a GPU cache of N experts. Balancedness is mean over max tokens per "
                       "device (1 = balanced), as serving engines log it. Load-aware policies (EPLB, co-activation) "
                       "are fitted on the fit window and judged on the evaluated one.", controls, body, problems,
                       search, PATH)


def _num(v, spec: str = ".3f", suffix: str = "") -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:{spec}}{suffix}"


def summary_table(df: pd.DataFrame, per_bytes: bool) -> html.Table:
    """One row per policy of the layer's window summary."""
    unit = "bytes" if per_bytes else "copies"
    heads = ("policy", "balancedness", "balancedness on fit window", "fit − eval gap", "overload (max / mean)",
             f"all-to-all {unit} per step", "vs current", "traffic vs current", "suggested")
    rows = [html.Tr([html.Td(r.policy), html.Td(_num(r.balancedness)), html.Td(_num(r.balancedness_fit)),
                     html.Td(_num(r.fit_eval_gap, "+.3f")), html.Td(_num(r.overload, ".3f", "×")),
                     html.Td(_num(r.bytes_per_step if per_bytes else r.copies_per_step, ",.0f")),
                     html.Td(_num(r.improvement, ".3f", "×")), html.Td(_num(r.traffic_ratio, ".3f", "×")),
                     html.Td("✓" if r.suggested else "")], className="suggested" if r.suggested else None)
            for r in df.itertuples()]
    return html.Table([html.Thead(html.Tr([html.Th(h) for h in heads])), html.Tbody(rows)], id="wi-summary-rows",
                      className="table")


def suggested_map(df: pd.DataFrame) -> html.P | None:
    """The suggested map, or why there is none: a map that balances no better than the current one is no advice."""
    best = df[df.suggested]
    if best.empty:
        if df.empty or not df.policy.isin(LOAD_AWARE).any():
            return None
        cur = df[df.policy == df.current.iloc[0]]
        why = ""
        if len(cur) and max(map(len, cur.placement.iloc[0]), default=0) <= 1:
            why = (" With one expert per device, moving experts only renumbers the devices: redundant slots, which "
                   "replicate the busiest experts, are what can balance them.")
        return html.P([html.Strong("No map suggested: "),
                       f"no load-aware policy balances the fit window at least {SUGGEST_GAIN:.0%} better than the "
                       f"current placement ({df.current.iloc[0]}), or as well with {SUGGEST_GAIN:.0%} less traffic." + why],
                      id="wi-suggested-map")
    r = best.iloc[0]
    devices = "; ".join(f"device {d}: {', '.join(map(str, experts)) or '—'}" for d, experts in enumerate(r.placement))
    return html.P([html.Strong(f"Suggested map ({r.policy}): "), devices], id="wi-suggested-map")


def device_bars(per_step: pd.DataFrame, policies: list[str], column: str, *, title: str, y_title: str,
                baseline_column: str | None = None, baseline_label: str = "") -> object:
    """Per device, the mean over the window's steps of `column`, one bar per policy (and its baseline hatched)."""
    mean = per_step.groupby(["device", "policy"])[[column] + ([baseline_column] if baseline_column else [])].mean()
    wide = mean[column].unstack("policy").reindex(columns=policies).reset_index()
    bars = {p: p for p in policies}
    baselines = None
    if baseline_column:
        recv = mean[baseline_column].unstack("policy").reindex(columns=policies).add_suffix(" " + baseline_label)
        wide = pd.concat([wide, recv.reset_index(drop=True)], axis=1)
        bars = {p: f"{p} sent" for p in policies}
        baselines = {f"{p} {baseline_label}": f"{p} {baseline_label}" for p in policies}
    return figures.grouped_bars(wide, "device", bars, baselines=baselines, title=title, x_title="device",
                                y_title=y_title)


def register(app: dash.Dash, ctx: common.Context) -> None:
    common.register_run_options(app, ctx, PREFIX)
    common.register_url_sync(app, PREFIX, PATH, CONTROLS)

    def empty_placement(msg, problems=None):
        fig = figures.empty_figure(msg)
        # The guard passes only the message: the URL's problems stay where they are.
        return fig, fig, fig, None, common.message(None, msg), dash.no_update if problems is None else common.message(problems)

    @app.callback(Output("wi-balancedness", "figure"), Output("wi-device-tokens", "figure"),
                  Output("wi-device-bytes", "figure"), Output("wi-summary", "children"),
                  Output("wi-placement-message", "children"), Output("wi-message", "children"),
                  Input("wi-runs", "value"), Input("wi-layer", "value"), Input("wi-step-min", "value"),
                  Input("wi-step-max", "value"), Input("wi-fit-min", "value"), Input("wi-fit-max", "value"),
                  Input("wi-ep-size", "value"), Input("wi-gpus", "value"), Input("wi-redundant", "value"),
                  Input("wi-policies", "value"), Input("wi-hidden", "value"), Input("wi-dtype", "value"),
                  State("wi-problems", "data"))
    @common.guarded(empty_placement)
    def placement(run, layer, step_min, step_max, fit_min, fit_max, ep_size, gpus, redundant, policies, hidden, dtype,
                  problems):
        if not run:
            return empty_placement("pick a run", problems)
        with ctx.store.reading(run):  # one segment listing and one connection for the callback's queries
            steps, layer_id, _, notes = common.resolve(ctx.store, run, layer, step_min, step_max)
            if layer_id is None:
                return empty_placement(figures.NO_DATA, problems)
            fit_steps, fit_note = fit_window(fit_min, fit_max)
            knob_notes: list[str] = []
            knobs = {name: checked(name, v, knob_notes) for name, v in (("ep_size", ep_size), ("gpus_per_node", gpus),
                                                                         ("redundant", redundant), ("hidden_size", hidden))}
            chosen = parse_policies(policies, knob_notes)
            notes += [fit_note, *knob_notes]
            if not chosen:
                return empty_placement("pick one or more policies", problems)
            if dtype not in DTYPES:
                notes.append(f"ignored dtype {str(dtype)[:40]!r}; using bfloat16")
                dtype = "bfloat16"
            options = dict(run=run, layers=[layer_id], steps=steps, ep_size=knobs["ep_size"],
                           gpus_per_node=knobs["gpus_per_node"], redundant_slots=knobs["redundant"] or 0, policy=chosen,
                           hidden_size=knobs["hidden_size"], dtype=dtype, fit_steps=fit_steps)
            summary = compute_metric(ctx.store, "placement", by="window", **options)
            per_step = compute_metric(ctx.store, "placement", by="step", **options)
            g = int(summary.ep_size.iloc[0])
            where = f"layer {layer_id}, {g} devices"
            balance = per_step.groupby(["policy", "step"], as_index=False, sort=False)["balancedness"].first()
            lines = figures.step_lines({p: balance[balance.policy == p] for p in chosen}, "balancedness",
                                       title=f"Balancedness per step — {where}", y_title="mean / max tokens per device",
                                       baseline=1.0, baseline_label="balanced", uirevision=f"{run}|{layer_id}|{g}")
            tokens = device_bars(per_step, chosen, "tokens", title=f"Tokens per device, mean per step — {where}",
                                 y_title="(token, expert) assignments per step")
            per_bytes = knobs["hidden_size"] is not None
            unit = "bytes" if per_bytes else "copies"
            traffic = device_bars(per_step, chosen, f"{unit}_sent", baseline_column=f"{unit}_recv",
                                  baseline_label="received",
                                  title=f"All-to-all dispatch {unit} per device, mean per step — {where}"
                                        + ("" if per_bytes else " (give a hidden size for bytes)"),
                                  y_title=f"{unit} per step")
            fitted = "the evaluated window itself" if fit_steps is None else f"steps {fit_steps[0]}..{fit_steps[1]}"
            aware = ", ".join(p for p in chosen if p in LOAD_AWARE) or "none picked"
            table = html.Div([html.P(f"Load-aware policies ({aware})"
                                     f" fitted on {fitted}; current placement: {summary.current.iloc[0]}.",
                                     className="muted"),
                              summary_table(summary, per_bytes), suggested_map(summary)])
            return lines, tokens, traffic, table, None, common.message(problems, *notes)

    def empty_cache(msg):
        return figures.empty_figure(msg), None, common.message(None, msg)

    @app.callback(Output("wi-cache-curve", "figure"), Output("wi-cache-table", "children"),
                  Output("wi-cache-message", "children"),
                  Input("wi-runs", "value"), Input("wi-layer", "value"), Input("wi-step-min", "value"),
                  Input("wi-step-max", "value"), Input("wi-cache-sizes", "value"))
    @common.guarded(empty_cache)
    def cache(run, layer, step_min, step_max, sizes_text):
        if not run:
            return empty_cache("pick a run")
        with ctx.store.reading(run):  # one segment listing and one connection for the callback's queries
            steps, layer_id, meta, _ = common.resolve(ctx.store, run, layer, step_min, step_max)
            if layer_id is None:
                return empty_cache(figures.NO_DATA)
            experts = int(meta.loc[meta["layer"] == layer_id, "E"].iloc[0])
            sizes, note = parse_cache_sizes(sizes_text, experts)
            df = compute_metric(ctx.store, "expert_cache", run=run, layers=[layer_id], steps=steps, cache_sizes=sizes)
            if df.empty:
                return figures.empty_figure(figures.NO_DATA), None, common.message(None, note)
            ideal = "top-N coverage (best static set)"
            series = {ideal: df.assign(value=df.coverage), "LRU hit rate": df.assign(value=df.lru_hit_rate),
                      "LFU hit rate": df.assign(value=df.lfu_hit_rate)}
            fig = figures.xy_lines(series, "cache_size", "value",
                                   title=f"Cache of N experts — layer {layer_id} of {experts}",
                                   x_title="cache size N (experts held)", y_title="share of assignments served",
                                   uirevision=f"{run}|{layer_id}", dash_names={ideal})
            fig.update_xaxes(tickmode="array", tickvals=sizes)  # whole numbers of experts only
            if max(sizes) >= 16 * min(sizes):  # 1, 2, 4 … 256 would crowd the left end of a linear axis
                fig.update_xaxes(type="log")
            table = html.Table([html.Thead(html.Tr([html.Th(h) for h in ("N", "top-N coverage", "LRU hit rate",
                                                                           "LFU hit rate", "accesses")])),
                                html.Tbody([html.Tr([html.Td(r.cache_size), html.Td(_num(r.coverage, ".2%")),
                                                     html.Td(_num(r.lru_hit_rate, ".2%")),
                                                     html.Td(_num(r.lfu_hit_rate, ".2%")),
                                                     html.Td(f"{r.accesses:,}")]) for r in df.itertuples()])],
                               id="wi-cache-rows", className="table")
            return fig, table, common.message(None, note)
