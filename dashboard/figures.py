"""Plotly figures for the dashboard pages, built from metric DataFrames (pure: no store access).

Every figure names its axes with units, draws steps as integers, says "no data for this
scope" instead of drawing an empty frame, and keeps `uirevision` fixed per view so the
periodic refresh keeps the user's zoom. Long step ranges are averaged into at most
MAX_COLUMNS buckets so a heatmap stays drawable at 64 layers × 256 experts × 100k steps.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go

NO_DATA = "no data for this scope"
MAX_COLUMNS = 400  # step buckets drawn in one heatmap
_MARGIN = dict(l=70, r=20, t=70, b=50)
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
# Utilisation (load over fair share) on the fixed colour scale: 0 = dead, 1 = fair, 3+ = hot.
FIXED_UTILISATION_RANGE = (0.0, 3.0)


# Titles longer than this break onto a second line at their last separator within it: half-width panels cut them.
TITLE_CHARS = 60
_SEPARATORS = (" — ", " vs ", ": ", ", ", " (")


def fit_title(title: str) -> str:
    """`title` on two lines when longer than TITLE_CHARS, broken after its last separator that keeps line one short."""
    if len(title) <= TITLE_CHARS or "<br>" in title:
        return title
    cuts = [(title.rfind(sep, 0, TITLE_CHARS), sep) for sep in _SEPARATORS]
    at, sep = max(cuts)
    if at <= 0:
        return title
    head, tail = title[:at], title[at + len(sep):]
    return f"{head}<br>({tail}" if sep == " (" else f"{head}{sep.rstrip()}<br>{tail}"  # "(" opens line two


def empty_figure(message: str = NO_DATA, title: str = "") -> go.Figure:
    fig = go.Figure()
    fig.update_layout(title=fit_title(title), margin=_MARGIN, xaxis={"visible": False}, yaxis={"visible": False}, height=320,
                      annotations=[{"text": message, "showarrow": False, "font": {"size": 14, "color": "#666"},
                                    "xref": "paper", "yref": "paper", "x": 0.5, "y": 0.5}])
    return fig


def ema(values, weight: float) -> np.ndarray:
    """TensorBoard's debiased exponential moving average: s_n = (w·s_{n-1} + (1−w)·x_n) / (1 − w^n).

    NaN points stay NaN and do not move the average; weight 0 returns the values unchanged.
    """
    x = np.asarray(values, dtype=float)
    if not weight:
        return x.copy()
    out = np.full_like(x, np.nan)
    last, n = 0.0, 0
    for i, v in enumerate(x):
        if not math.isfinite(v):
            continue
        last = last * weight + (1.0 - weight) * v
        n += 1
        out[i] = last / (1.0 - weight ** n)
    return out


def step_axis(steps) -> dict:
    """An x axis of whole steps: unit ticks on short ranges, integer labels otherwise."""
    steps = list(steps)
    span = (max(steps) - min(steps)) if steps else 0
    axis = {"title": {"text": "step"}, "tickformat": "d"}
    if span <= 12:
        axis["dtick"] = 1
    return axis


def step_lines(series: dict[str, pd.DataFrame], value: str, *, title: str, y_title: str, smoothing: float = 0.0,
               uirevision: str = "", baseline: float | None = None, baseline_label: str = "") -> go.Figure:
    """One line per named series (columns step and `value`); smoothed with `ema` when smoothing > 0,
    the raw points kept faint behind. A dotted horizontal line marks `baseline` when given."""
    series = {name: df.dropna(subset=[value]).sort_values("step") for name, df in series.items() if not df.empty}
    series = {name: df for name, df in series.items() if not df.empty}
    if not series:
        return empty_figure(NO_DATA, title)
    fig = go.Figure()
    for i, (name, df) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        steps = df["step"].astype("int64").to_numpy()  # arrays, not lists: plotly checks a list item by item
        raw = df[value].astype(float).to_numpy()
        if smoothing:
            fig.add_trace(go.Scatter(x=steps, y=raw, mode="lines", name=f"{name} (raw)", showlegend=False,
                                     line={"color": colour, "width": 1}, opacity=0.3, hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=steps, y=ema(raw, smoothing), mode="lines+markers" if len(steps) < 60 else "lines",
                                 name=name, line={"color": colour}, marker={"size": 4},
                                 hovertemplate=f"{name}<br>step %{{x}}<br>{y_title} %{{y:.4g}}<extra></extra>"))
    if baseline is not None and math.isfinite(baseline):
        fig.add_hline(y=baseline, line={"color": "#999", "dash": "dot"}, annotation_text=baseline_label,
                      annotation_position="top left")
    all_steps = [s for df in series.values() for s in df["step"].astype("int64")]
    fig.update_layout(title=fit_title(title), margin=_MARGIN, xaxis=step_axis(all_steps), yaxis={"title": {"text": y_title}},
                      legend={"orientation": "h", "y": -0.25}, uirevision=uirevision, height=340)
    return fig


def band_chart(df: pd.DataFrame, *, title: str, y_title: str, uirevision: str = "", smoothing: float = 0.0,
               baseline: float | None = None, baseline_label: str = "", onsets: list[int] | None = None) -> go.Figure:
    """The p05–p95 band with the mean over steps (columns step, mean, p05, p95); vertical markers at `onsets`."""
    df = df.dropna(subset=["mean"]).sort_values("step") if not df.empty else df
    if df.empty:
        return empty_figure(NO_DATA, title)
    steps = df["step"].astype("int64").to_numpy()
    fig = go.Figure([
        go.Scatter(x=steps, y=ema(df["p95"], smoothing), mode="lines", line={"width": 0, "color": COLOURS[0]},
                   name="p95", showlegend=False, hovertemplate="step %{x}<br>p95 %{y:.4g}<extra></extra>"),
        go.Scatter(x=steps, y=ema(df["p05"], smoothing), mode="lines", line={"width": 0, "color": COLOURS[0]},
                   fill="tonexty", fillcolor="rgba(31,119,180,0.2)", name="p05–p95",
                   hovertemplate="step %{x}<br>p05 %{y:.4g}<extra></extra>"),
        go.Scatter(x=steps, y=ema(df["mean"], smoothing), mode="lines+markers" if len(steps) < 60 else "lines",
                   line={"color": COLOURS[0]}, marker={"size": 4}, name="mean",
                   hovertemplate="step %{x}<br>mean %{y:.4g}<extra></extra>"),
    ])
    if baseline is not None and math.isfinite(baseline):
        # at the right end, under the line: an onset's label sits at the top of its marker, often the first step
        fig.add_hline(y=baseline, line={"color": "#999", "dash": "dot"}, annotation_text=baseline_label,
                      annotation_position="bottom right")
    for step in onsets or []:
        fig.add_vline(x=int(step), line={"color": "#d62728", "dash": "dash"}, annotation_text=f"collapse onset {int(step)}")
    fig.update_layout(title=fit_title(title), margin=_MARGIN, xaxis=step_axis(steps), yaxis={"title": {"text": y_title}},
                      legend={"orientation": "h", "y": -0.25}, uirevision=uirevision, height=340)
    return fig


def _bucket_steps(df: pd.DataFrame, value: str, row: str) -> tuple[pd.DataFrame, int]:
    """Average `value` over step buckets so at most MAX_COLUMNS columns remain; returns (frame, bucket width)."""
    steps = df["step"].astype("int64")
    span = int(steps.max() - steps.min()) + 1
    width = max(1, math.ceil(span / MAX_COLUMNS))
    if width == 1:
        return df.assign(step=steps), 1
    lo = int(steps.min())
    df = df.assign(step=lo + (steps - lo) // width * width)
    return df.groupby(["step", row], as_index=False)[value].mean(), width


def step_heatmap(df: pd.DataFrame, value: str, row: str, *, title: str, row_title: str, colour_title: str,
                 zrange: tuple[float, float] | None = None, colorscale: str = "Viridis", uirevision: str = "",
                 row_label: str = "") -> go.Figure:
    """`row` × step heatmap of `value` (e.g. layer × step MaxVio, expert × step utilisation).

    zrange fixes the colour scale (so two views compare by colour); None lets it follow the data.
    """
    df = df.dropna(subset=[value]) if not df.empty else df
    if df.empty:
        return empty_figure(NO_DATA, title)
    df, width = _bucket_steps(df, value, row)
    grid = df.pivot_table(index=row, columns="step", values=value, aggfunc="mean").sort_index()
    rows = [int(r) for r in grid.index]
    zmin, zmax = zrange if zrange is not None else (None, None)
    fig = go.Figure(go.Heatmap(
        z=grid.to_numpy(), x=[int(s) for s in grid.columns], y=rows, colorscale=colorscale, zmin=zmin, zmax=zmax,
        colorbar={"title": {"text": colour_title}},
        hovertemplate=f"{row_label or row_title} %{{y}}<br>step %{{x}}<br>{colour_title} %{{z:.4g}}<extra></extra>"))
    suffix = f" (steps averaged in buckets of {width})" if width > 1 else ""
    fig.update_layout(title=fit_title(title + suffix), margin=_MARGIN, xaxis=step_axis(grid.columns),
                      yaxis={"title": {"text": row_title}, "autorange": "reversed", "tickformat": "d",
                             **({"dtick": 1} if len(rows) <= 16 else {})},
                      uirevision=uirevision, height=max(320, min(900, 140 + 12 * len(rows))))
    return fig


def matrix_heatmap(grid: pd.DataFrame, *, title: str, x_title: str, y_title: str, colour_title: str,
                   zrange: tuple[float, float] | None = None, colorscale: str | list = "Viridis",
                   uirevision: str = "", hover_extra=None) -> go.Figure:
    """A labelled matrix (index → rows, columns → columns), e.g. domain × expert or expert × expert."""
    if grid.empty:
        return empty_figure(NO_DATA, title)
    zmin, zmax = zrange if zrange is not None else (None, None)
    trace = dict(z=grid.to_numpy(dtype=float), x=[str(c) for c in grid.columns], y=[str(r) for r in grid.index],
                 colorscale=colorscale, zmin=zmin, zmax=zmax, colorbar={"title": {"text": colour_title}},
                 hovertemplate=f"{y_title} %{{y}}<br>{x_title} %{{x}}<br>{colour_title} %{{z:.4g}}<extra></extra>")
    if hover_extra is not None:
        trace["customdata"] = hover_extra
        trace["hovertemplate"] = trace["hovertemplate"].replace("<extra>", "<br>%{customdata}<extra>")
    fig = go.Figure(go.Heatmap(**trace))
    fig.update_layout(title=fit_title(title), margin=_MARGIN, uirevision=uirevision,
                      xaxis={"title": {"text": x_title}, "type": "category"},
                      yaxis={"title": {"text": y_title}, "type": "category", "autorange": "reversed"},
                      height=max(320, min(900, 160 + 14 * len(grid.index))))
    return fig


def over_uniform_scale(*grids: pd.DataFrame | None) -> dict:
    """matrix_heatmap's colours for shares ÷ the uniform share: white at 1, blue below, red above, over one range
    [0, max] of all the grids given, so panels set side by side (two checkpoints, two versions) compare by colour."""
    values = [g.to_numpy(dtype=float) for g in grids if g is not None and not g.empty]
    top = max([2.0] + [float(np.nanmax(v)) for v in values if np.isfinite(v).any()])
    return {"zrange": (0.0, top), "colorscale": [[0.0, "#2166ac"], [1.0 / top, "#f7f7f7"], [1.0, "#b2182b"]]}


def grouped_bars(df: pd.DataFrame, x: str, bars: dict[str, str], *, title: str, x_title: str, y_title: str,
                 baselines: dict[str, str] | None = None, uirevision: str = "") -> go.Figure:
    """Bars of each column in `bars` (column → legend name) against `x`, each followed by its
    baseline from `baselines` (same order) drawn hatched in the same colour."""
    if df.empty:
        return empty_figure(NO_DATA, title)
    fig = go.Figure()
    base_items = list((baselines or {}).items())
    for i, (col, name) in enumerate(bars.items()):
        colour = COLOURS[i % len(COLOURS)]
        fig.add_trace(go.Bar(x=[str(v) for v in df[x]], y=df[col], name=name, marker={"color": colour},
                             hovertemplate=f"{x_title} %{{x}}<br>{name} %{{y:.4g}}<extra></extra>"))
        if i < len(base_items):
            bcol, bname = base_items[i]
            fig.add_trace(go.Bar(x=[str(v) for v in df[x]], y=df[bcol], name=bname,
                                 marker={"color": "rgba(0,0,0,0)", "line": {"color": colour, "width": 2},
                                         "pattern": {"shape": "/", "fgcolor": colour}},
                                 hovertemplate=f"{x_title} %{{x}}<br>{bname} %{{y:.4g}}<extra></extra>"))
    fig.update_layout(title=fit_title(title), margin=_MARGIN, barmode="group", uirevision=uirevision, height=340,
                      xaxis={"title": {"text": x_title}, "type": "category"}, yaxis={"title": {"text": y_title}},
                      legend={"orientation": "h", "y": -0.25})
    return fig


def xy_lines(series: dict[str, pd.DataFrame], x: str, y: str, *, title: str, x_title: str, y_title: str,
             uirevision: str = "", x_category: bool = False, dash_names: set[str] | None = None) -> go.Figure:
    """Lines of `y` against `x`, one per named frame; names in dash_names are drawn dashed (baselines)."""
    series = {k: v for k, v in series.items() if not v.empty}
    if not series:
        return empty_figure(NO_DATA, title)
    fig = go.Figure()
    for i, (name, df) in enumerate(series.items()):
        xs = [str(v) for v in df[x]] if x_category else df[x].tolist()
        fig.add_trace(go.Scatter(x=xs, y=df[y], mode="lines+markers", name=name,
                                 line={"color": COLOURS[i % len(COLOURS)],
                                       "dash": "dot" if dash_names and name in dash_names else "solid"},
                                 hovertemplate=f"{name}<br>{x_title} %{{x}}<br>{y_title} %{{y:.4g}}<extra></extra>"))
    fig.update_layout(title=fit_title(title), margin=_MARGIN, uirevision=uirevision, height=340,
                      xaxis={"title": {"text": x_title}, **({"type": "category"} if x_category else {})},
                      yaxis={"title": {"text": y_title}}, legend={"orientation": "h", "y": -0.25})
    return fig
