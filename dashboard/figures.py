"""Plotly figures for the dashboard, built from metric DataFrames (pure: no store access).

Every figure keeps `uirevision` fixed per run so the 5 s refresh keeps the user's zoom.
"""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

_MARGIN = dict(l=60, r=20, t=40, b=40)
_LAYER_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                  "#bcbd22", "#17becf"]


def empty_figure(message: str, title: str = "") -> go.Figure:
    fig = go.Figure()
    fig.update_layout(title=title, margin=_MARGIN, xaxis={"visible": False}, yaxis={"visible": False},
                      annotations=[{"text": message, "showarrow": False, "font": {"size": 14, "color": "#666"},
                                    "xref": "paper", "yref": "paper", "x": 0.5, "y": 0.5}])
    return fig


def load_heatmap(share: pd.DataFrame, *, run: str, checkpoint: str | None) -> go.Figure:
    """Layer × expert load share (columns layer, expert, share, uniform of `load_share` by window)."""
    if share.empty:
        return empty_figure("no expert load recorded for this selection", "Expert load share")
    grid_LE = share.pivot_table(index="layer", columns="expert", values="share", aggfunc="sum").sort_index()
    uniform = float(share["uniform"].max())
    fig = go.Figure(go.Heatmap(
        z=grid_LE.to_numpy(), x=[str(e) for e in grid_LE.columns], y=[f"layer {l}" for l in grid_LE.index],
        colorscale="Viridis", zmin=0, colorbar={"title": {"text": "share"}},
        hovertemplate="%{y}, expert %{x}<br>share %{z:.3f}<extra></extra>"))
    where = f"checkpoint {checkpoint}" if checkpoint else "all checkpoints"
    fig.update_layout(title=f"Expert load share ({where}; uniform = {uniform:.3f})", margin=_MARGIN,
                      xaxis={"title": {"text": "expert"}, "type": "category"}, yaxis={"autorange": "reversed"},
                      uirevision=run)
    return fig


def _per_layer_lines(df: pd.DataFrame, value: str, *, title: str, y_title: str, run: str) -> go.Figure:
    fig = go.Figure()
    for i, (layer, part) in enumerate(df.groupby("layer", sort=True)):
        part = part.sort_values("step")
        fig.add_trace(go.Scatter(x=part["step"], y=part[value], mode="lines+markers", name=f"layer {layer}",
                                 line={"color": _LAYER_COLOURS[i % len(_LAYER_COLOURS)]}, marker={"size": 4}))
    fig.update_layout(title=title, margin=_MARGIN, xaxis={"title": {"text": "step"}}, yaxis={"title": {"text": y_title}},
                      legend={"orientation": "h", "y": -0.2}, uirevision=run)
    return fig


def maxvio_chart(maxvio: pd.DataFrame, *, run: str) -> go.Figure:
    """MaxVio per batch over steps (columns step, layer, maxvio, maxvio_mean_layers of `maxvio` by step)."""
    if maxvio.empty:
        return empty_figure("no expert load recorded yet", "MaxVio")
    fig = _per_layer_lines(maxvio, "maxvio", title="MaxVio per step (0 = perfectly balanced)", y_title="MaxVio", run=run)
    mean = maxvio.drop_duplicates("step").sort_values("step")
    fig.add_trace(go.Scatter(x=mean["step"], y=mean["maxvio_mean_layers"], mode="lines", name="mean over layers",
                             line={"color": "black", "dash": "dash"}))
    return fig


def entropy_chart(entropy: pd.DataFrame, *, run: str) -> go.Figure:
    """Mean per-token router entropy over steps (columns step, layer, mean, uniform of `entropy` by step)."""
    if entropy.empty:
        return empty_figure("no router statistics recorded yet", "Router entropy")
    fig = _per_layer_lines(entropy, "mean", title="Mean router entropy (nats; dotted: uniform, ln E)",
                           y_title="entropy (nats)", run=run)
    for value in sorted(set(entropy["uniform"].dropna())):
        fig.add_hline(y=float(value), line={"color": "#999", "dash": "dot"})
    return fig


def domain_heatmap(spec: pd.DataFrame, *, run: str) -> go.Figure:
    """Share of each domain's tokens routed to each expert (`domain_specialisation` by window)."""
    if spec.empty:
        return empty_figure("no domain labels recorded", "Domain specialisation")
    spec = spec.assign(row=[f"layer {l} · {d}" for l, d in zip(spec["layer"], spec["domain"])])
    grid = spec.pivot_table(index="row", columns="expert", values="share", aggfunc="sum", sort=True)
    uniform = float(spec["uniform"].max())
    fig = go.Figure(go.Heatmap(
        z=grid.to_numpy(), x=[str(e) for e in grid.columns], y=list(grid.index), colorscale="Magma", zmin=0,
        colorbar={"title": {"text": "share"}}, hovertemplate="%{y}, expert %{x}<br>share %{z:.3f}<extra></extra>"))
    fig.update_layout(title=f"Domain specialisation: share of a domain's tokens with the expert in top-k (uniform = {uniform:.3f})",
                      margin=_MARGIN, xaxis={"title": {"text": "expert"}, "type": "category"},
                      yaxis={"autorange": "reversed"}, uirevision=run, height=120 + 28 * len(grid.index))
    return fig
