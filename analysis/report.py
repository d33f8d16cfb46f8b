"""Incident report of one run: a self-contained HTML file (charts inline) and a Markdown summary.

`moescope report RUN [--around STEP] [--out PATH]`. The report says what happened (the
collapse verdict of every layer, analysis/collapse.py), in which layers and from which
step, the evidence rows (experts that starved or took over, their shares), the alert
events stored for the run (analysis/alerts.list_events), whether the capture itself is
sound (analysis/validate.py), and what to check next. The HTML embeds plotly.js, so it
opens with no network; charts zoom on `around` (default: the earliest onset).
"""
from __future__ import annotations

import html
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from moescope.analysis import alerts, compute_metric
from moescope.analysis.validate import validate_run

WINDOW = 50          # steps either side of `around` drawn in the charts
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


@dataclass
class Report:
    html_path: Path
    markdown_path: Path
    markdown: str


@dataclass
class _Findings:
    run: str
    layers: pd.DataFrame       # collapse, detail="layers"
    evidence: pd.DataFrame     # collapse, detail="evidence"
    series: pd.DataFrame       # collapse, by="step"
    shares: pd.DataFrame       # load_share by step, affected layers
    events: list[dict]
    validation: object
    checkpoints: pd.DataFrame
    capacity: dict             # layer -> capacity factor (None: the router never drops)
    around: int | None
    span: tuple[int, int]      # steps drawn


def _paths(run: str, out) -> tuple[Path, Path]:
    path = Path(out) if out is not None else Path.cwd() / f"moescope-report-{run}.html"
    path = path.expanduser().absolute()
    if path.suffix.lower() not in (".html", ".htm"):
        path = path.with_name(path.name + ".html")
    if not path.parent.is_dir():
        raise ValueError(f"output directory {str(path.parent)!r} does not exist")
    return path, path.with_suffix(".md")


def _gather(store, run: str, around: int | None) -> _Findings:
    store.require_run(run)
    if around is not None and (isinstance(around, bool) or not isinstance(around, int)):
        raise ValueError(f"--around must be a step (an int), got {around!r}")
    layers = compute_metric(store, "collapse", run)
    if layers.empty:
        raise ValueError(f"run {run!r} has no recorded routing to report on")
    lo, hi = int(layers.first_step.min()), int(layers.last_step.max())
    if around is not None and not lo <= around <= hi:
        raise ValueError(f"step {around} is outside the recorded steps {lo}..{hi} of run {run!r}")
    evidence = compute_metric(store, "collapse", run, detail="evidence")
    onsets = layers.onset_step.dropna()
    focus = around if around is not None else (int(onsets.min()) if not onsets.empty else None)
    span = (max(lo, focus - WINDOW), min(hi, focus + WINDOW)) if focus is not None else (lo, hi)
    affected = layers[layers.verdict.isin(["collapsing", "collapsed"])].layer.astype(int).tolist()
    chart_layers = affected or layers.layer.astype(int).tolist()[:4]
    series = compute_metric(store, "collapse", run, by="step")
    shares = compute_metric(store, "load_share", run, layers=chart_layers, steps=span,
                            phase="train" if "train" in _phases(store, run) else None)
    return _Findings(run, layers, evidence, series[series.step.between(*span)], shares,
                     alerts.list_events(store, run=run), validate_run(store, run), store.checkpoints(run),
                     {int(r.layer): r.capacity_factor for r in store.layers(run).itertuples()}, focus, span)


def _phases(store, run: str) -> list[str]:
    return store.sql("SELECT DISTINCT phase FROM expert_step", run=run)["phase"].dropna().tolist()


# ------------------------------------------------------------------ charts

def _onset_lines(fig: go.Figure, f: _Findings, layer: int | None = None) -> None:
    rows = f.layers if layer is None else f.layers[f.layers.layer == layer]
    for r in rows.itertuples():
        if not pd.isna(r.onset_step):
            fig.add_vline(x=int(r.onset_step), line={"color": "#d62728", "dash": "dash"},
                          annotation_text=f"onset L{r.layer}" if layer is None else "onset")
    if f.around is not None:
        fig.add_vline(x=f.around, line={"color": "#999", "dash": "dot"})


def _share_figure(f: _Findings, layer: int) -> go.Figure:
    df = f.shares[f.shares.layer == layer]
    marked = set(f.evidence[f.evidence.layer == layer].expert.astype(int)) if not f.evidence.empty else set()
    fig = go.Figure()
    for i, (expert, g) in enumerate(df.groupby("expert")):
        fig.add_trace(go.Scatter(x=g.step, y=g.share, mode="lines", name=f"expert {expert}",
                                 line={"color": COLOURS[i % len(COLOURS)], "width": 3 if expert in marked else 1},
                                 opacity=1.0 if expert in marked or not marked else 0.35))
    if not df.empty:
        fig.add_hline(y=float(df.uniform.iloc[0]), line={"color": "#999", "dash": "dot"}, annotation_text="fair share 1/E")
    _onset_lines(fig, f, layer)
    fig.update_layout(title=f"Layer {layer}: load share per expert", xaxis_title="step", yaxis_title="share of assignments",
                      height=360, margin=dict(l=60, r=20, t=50, b=40))
    return fig


def _series_figure(f: _Findings, column: str, title: str, y_title: str) -> go.Figure:
    fig = go.Figure()
    for i, (layer, g) in enumerate(f.series.groupby("layer")):
        fig.add_trace(go.Scatter(x=g.step, y=g[column], mode="lines", name=f"layer {layer}",
                                 line={"color": COLOURS[i % len(COLOURS)]}))
    _onset_lines(fig, f)
    fig.update_layout(title=title, xaxis_title="step", yaxis_title=y_title, height=320, margin=dict(l=60, r=20, t=50, b=40))
    return fig


def _figures(f: _Findings) -> list[go.Figure]:
    figs = [_share_figure(f, int(layer)) for layer in sorted(f.shares.layer.unique())]
    figs.append(_series_figure(f, "divergence", "Load divergence KL(f ‖ uniform) per layer", "nats"))
    figs.append(_series_figure(f, "entropy", "Mean router entropy per layer", "nats"))
    figs.append(_series_figure(f, "margin", "Mean top-1/top-2 margin per layer", "probability"))
    return figs


# ------------------------------------------------------------------ text

def _fmt_share(x) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _md_table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def _next_checks(f: _Findings) -> list[str]:
    checks = []
    if not f.validation.ok:
        bad = ", ".join(c.name for c in f.validation.checks if not c.ok)
        checks.append(f"The capture itself has violations ({bad}): run `moescope validate {f.run}` and fix the capture "
                      f"path before trusting these numbers.")
    hit = f.layers[f.layers.verdict.isin(["collapsing", "collapsed"])]
    for r in hit.itertuples():
        onset = int(r.onset_step)
        starved = [e for e, role in zip(r.evidence_experts, r.evidence_roles) if role == "starved"]
        took = [e for e, role in zip(r.evidence_experts, r.evidence_roles) if role == "took_over"]
        near = f.checkpoints[(f.checkpoints.step.notna()) & ((f.checkpoints.step - onset).abs() <= WINDOW)]
        checks.append(f"Layer {r.layer}: what changed at step {onset} — learning rate, data mix, a resumed checkpoint"
                      + (f" (checkpoints near it: {', '.join(near.checkpoint)})" if not near.empty else "")
                      + ", the balance-loss coefficient, router z-loss.")
        metric = f"store.metric(\"vocab_specialisation\", run=\"{f.run}\", layers=[{r.layer}], steps="
        before, after = f"({max(int(r.first_step), onset - WINDOW)}, {onset - 1})", f"({onset}, {onset + WINDOW})"
        if starved:
            checks.append(f"Layer {r.layer}: which tokens experts {starved} took before step {onset}, and where they "
                          f"went: `{metric}{before})` against `{metric}{after})`.")
        if took:
            checks.append(f"Layer {r.layer}: which tokens experts {took} took over: `{metric}{after})` against "
                          f"`{metric}{before})`.")
            if f.capacity.get(int(r.layer)):
                checks.append(f"Layer {r.layer}: capacity drops on experts {took} — "
                              f"`store.metric(\"drop_rate\", run=\"{f.run}\", layers=[{r.layer}])`.")
    if hit.empty:
        imbalanced = f.layers[f.layers.verdict == "imbalanced"].layer.astype(int).tolist()
        checks.append("No collapse onset found." + (f" Layers {imbalanced} are imbalanced since their first recorded "
                                                     f"step: compare with an earlier run." if imbalanced else ""))
    if f.events:
        checks.append("Compare the alert events below with the onsets: an alert that fired long after an onset needs a "
                      "shorter window or lower threshold.")
    return checks


def _markdown(f: _Findings) -> str:
    hit = f.layers[f.layers.verdict.isin(["collapsing", "collapsed"])]
    lines = [f"# Incident report: run `{f.run}`", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; steps {int(f.layers.first_step.min())}–"
             f"{int(f.layers.last_step.max())}; charts cover steps {f.span[0]}–{f.span[1]}.", "", "## What happened", ""]
    if hit.empty:
        lines.append("No layer is collapsing or collapsed.")
    else:
        first = hit.sort_values("onset_step").iloc[0]
        lines.append(f"{len(hit)} of {len(f.layers)} layers collapsing or collapsed, the first from step "
                     f"{int(first.onset_step)} (layer {int(first.layer)}).")
    lines += [""] + _md_table(["layer", "verdict", "onset step", "summary"],
                              [[int(r.layer), r.verdict, "—" if r.verdict not in ("collapsing", "collapsed") else int(r.onset_step),
                                r.summary] for r in f.layers.itertuples()])
    lines += ["", "## Evidence", ""]
    if f.evidence.empty:
        lines.append("No expert starved or took over.")
    else:
        lines += _md_table(["layer", "expert", "role", "onset step", "share before", "share after onset", "share now"],
                           [[int(r.layer), int(r.expert), r.role, int(r.onset_step), _fmt_share(r.share_before),
                             _fmt_share(r.share_after), _fmt_share(r.share_now)] for r in f.evidence.itertuples()])
    changes = [[int(r.layer), f"{r.entropy_before:.3f} → {r.entropy_after:.3f}", f"{r.margin_before:.3f} → {r.margin_after:.3f}"]
               for r in hit.itertuples() if not math.isnan(r.entropy_before)]
    if changes:
        lines += ["", "Router entropy and margin around the onset (segment means either side):", ""]
        lines += _md_table(["layer", "entropy (nats)", "top-1/top-2 margin"], changes)
    lines += ["", "## Alerts that fired", ""]
    if not f.events:
        lines.append("No alert events recorded for this run.")
    else:
        lines += _md_table(["rule", "layer", "state", "step", "value"],
                           [[e.get("rule_id"), e.get("layer"), e.get("state"), e.get("step"),
                             _fmt_share(e.get("value"))] for e in f.events[:20]])
    lines += ["", "## Capture checks", "", ("All capture checks pass." if f.validation.ok else
              "Failed: " + ", ".join(f"{c.name} ({c.violations})" for c in f.validation.checks if not c.ok))]
    lines += ["", "## What to check next", ""] + [f"- {c}" for c in _next_checks(f)]
    return "\n".join(lines) + "\n"


def _markdown_to_html(md: str) -> str:
    """The summary's own small Markdown subset (headings, tables, bullets, paragraphs) as HTML."""
    out, table = [], []

    def inline(text: str) -> str:
        parts = html.escape(text).split("`")
        return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))

    def flush():
        if table:
            head, body = table[0], table[2:]
            out.append("<table><thead><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr></thead><tbody>"
                       + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>" for row in body)
                       + "</tbody></table>")
            table.clear()
    for line in md.splitlines():
        if line.startswith("|"):
            table.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        flush()
        if line.startswith("## "):
            out.append(f"<h2>{inline(line[3:])}</h2>")
        elif line.startswith("# "):
            out.append(f"<h1>{inline(line[2:])}</h1>")
        elif line.startswith("- "):
            out.append(f"<ul><li>{inline(line[2:])}</li></ul>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    flush()
    return "\n".join(out)


_STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}code{background:#f3f3f3;padding:0 .2em}ul{margin:.2em 0}"""


def write_report(store, run: str, *, around: int | None = None, out=None) -> Report:
    """Write RUN's incident report: HTML at `out` (default ./moescope-report-RUN.html) and Markdown beside it."""
    html_path, md_path = _paths(run, out)
    f = _gather(store, run, around)
    md = _markdown(f)
    charts = [fig.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, fig in enumerate(_figures(f))]
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>moescope incident report: {html.escape(run)}</title>"
            f"<style>{_STYLE}</style></head><body>{_markdown_to_html(md)}<h2>Charts</h2>{''.join(charts)}</body></html>")
    html_path.write_text(page, encoding="utf-8")
    md_path.write_text(md, encoding="utf-8")
    return Report(html_path, md_path, md)
