"""Routing collapse per layer: a verdict, the onset step, and the evidence (METRICS.md §1, §5, §8, §10).

Legend: N steps, E experts, k slots per token, u_i = E·f_i the utilisation of expert i
(f_i its load share, METRICS.md §1; u_i = load_i / (T·k/E), §5), D = KL(f ‖ uniform) =
ln E − H(f) the load divergence (0 when balanced).

Definition.
1. Series. Per training step (phase "train" when the run has one, else every row): the
   load share of every expert (`load_share`, exact, from expert_step), the mean router
   entropy (`entropy`, §8) and the mean top-1/top-2 margin (`margin`, §10).
2. Change points. The signal per step is [ln((load_i + ½)/(load/E + ½)) for every expert,
   mean entropy, mean margin]; each group of columns is divided by its noise level, the
   robust estimate σ̂ = 1.4826·MAD(Δx)/√2 from first differences (as in wild binary
   segmentation, Fryzlewicz 2014, §3). Segments are the exact penalised least-squares
   segmentation found by PELT (Killick, Fearnhead & Eckley 2012, JASA 107:1590) as
   `ruptures` runs it (Truong, Oudre & Vayatis 2020; `pelt` here, vectorised), with the BIC penalty (d + 1)·ln N per change
   (Schwarz 1978; d columns, unit noise after scaling) times `penalty` (default 1).
3. States of a segment, from its summed load. Starved expert: ū_i < `starved` (default
   0.1, the METRICS.md §5 starved threshold). Dominant expert: ū_i ≥ `dominant` (default 2:
   MaxVio ≥ 1, Wang et al. 2024 Eq. 4). Collapsed state: at least half the experts starved,
   or one expert in ≥ 90% of the tokens' top-k sets (f_i ≥ 0.9/k): the router sends nearly
   everything to the same experts (Shazeer et al. 2017 §4; Fedus et al. 2022 §2.2).
4. Onset. A change point τ is a collapse onset when, comparing the segment just before τ
   (the baseline) with the latest segment, some expert became starved (and fell at least
   2×) or became dominant (and rose at least 1.5×) — the ratios keep a layer hovering at a
   threshold from flipping —, one of them moves that way at τ itself by at least three
   standard errors (of the two segment means, noise from differences inside each), and every segment from τ
   on has a larger load divergence than the baseline. The baseline is the segment
   before τ, extended back over earlier segments to at least 2·`min_segment` recorded
   steps (a few noisy warm-up steps are no baseline). The onset is the earliest such τ after which an evidence expert
   covers at least half of its whole move within `window` recorded steps (so an
   early-training wobble, followed by a long stable stretch, is not the onset of a later
   starvation, while a slow decline fitted as a staircase of small steps starts at its
   first step); when no τ is that fast, the τ that gets furthest within the window. Its
   step is the first step of the segment after τ.
5. Verdict. collapsed: an onset and the latest segment in the collapsed state (or the
   layer was in that state from its first recorded step; the onset is then that step).
   collapsing: an onset, the latest segment not (yet) collapsed. imbalanced: no onset,
   but the latest segment has starved or dominant experts. healthy: none of these.

Long runs. PELT's work grows with the square of the steps, so a layer with more than
256 recorded steps is first summed into at most 256 buckets of consecutive steps; the
onset is then placed at full resolution by the best single split (least squares) of the
evidence experts' log-utilisation within one bucket either side of the coarse onset.

Thresholds only describe states; when things changed is decided by the change-point
fit, so a slow drift gets the step where it began, not the step a threshold was crossed.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from moescope.analysis import balance, health
from moescope.analysis.memo import BoundedMemo, segments_key
from moescope.analysis.query import Scope, check_options

VERDICTS = ("healthy", "imbalanced", "collapsing", "collapsed")
DETAILS = ("layers", "evidence")
_MAD_TO_SD = 1.4826
ONSET_PROGRESS = 0.5
MOVE_Z = 3.0
MAX_ROWS = 256  # PELT's work grows with the square of the steps: longer runs are bucketed


@dataclass(frozen=True)
class Settings:
    """The knobs of the definition above (module docstring, points 2–4)."""

    starved: float = 0.1
    dominant: float = 2.0
    penalty: float = 1.0
    min_segment: int = 3
    window: int = 20           # recorded steps: the onset's horizon, and the trajectories either side of it

    def __post_init__(self):
        for name in ("starved", "dominant", "penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.starved >= 1 or self.dominant <= 1:
            raise ValueError(f"need starved < 1 < dominant (utilisation 1 is the fair share), got {self.starved}, {self.dominant}")
        for name in ("min_segment", "window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass
class LayerSeries:
    """One layer's per-step inputs (rows with no tokens removed)."""

    layer: int
    k: int
    steps_N: np.ndarray
    load_NE: np.ndarray
    entropy_N: np.ndarray
    margin_N: np.ndarray


@dataclass
class Segment:
    lo: int            # row index, inclusive
    hi: int            # row index, exclusive
    util_E: np.ndarray
    share_E: np.ndarray
    divergence: float
    entropy: float
    margin: float


@dataclass
class Evidence:
    expert: int
    role: str          # "starved" or "took_over"
    share_before: float
    share_after: float
    share_now: float


@dataclass
class LayerVerdict:
    layer: int
    verdict: str
    onset_index: int | None
    segments: list[Segment]
    starved_now: list[int]
    dominant_now: list[int]
    evidence: list[Evidence] = field(default_factory=list)
    baseline: Segment | None = None
    after: Segment | None = None


def _noise(x_NC: np.ndarray) -> np.ndarray:
    """Each column's noise level: the MAD of its step-to-step changes, as a standard deviation."""
    d = np.diff(x_NC, axis=0)
    if d.shape[0] < 2:
        return np.zeros(d.shape[1])
    ok = np.isfinite(d) & (d != 0)  # a dead expert staying dead carries no noise information
    count = ok.sum(axis=0)
    med = _column_medians(d, ok, count)
    mad = _column_medians(np.abs(d - med), ok, count)
    return np.where(count >= 2, _MAD_TO_SD * mad / math.sqrt(2), 0.0)


def _column_medians(x: np.ndarray, ok: np.ndarray, count: np.ndarray) -> np.ndarray:
    """np.median of each column's `ok` values, every column in one sort (NaN where a column has none)."""
    s = np.sort(np.where(ok, x, np.inf), axis=0)
    lo = np.take_along_axis(s, (np.maximum(count, 1) - 1)[None] // 2, 0)[0]
    hi = np.take_along_axis(s, np.minimum(count // 2, len(s) - 1)[None], 0)[0]
    with np.errstate(invalid="ignore"):
        return np.where(count > 0, (lo + hi) / 2, np.nan)


def _scaled(cols: list[np.ndarray]) -> np.ndarray | None:
    """Columns divided by one pooled noise level (the median of theirs), or None if the group is flat."""
    if not cols:
        return None
    sigma = float(np.median(_noise(np.stack(cols, 1))))
    if sigma <= 0:
        spread = max(float(np.nanstd(c)) for c in cols)
        if spread <= 0:
            return None
        sigma = spread  # noiseless but not constant: changes are still seen, at unit scale
    return np.stack(cols, 1) / sigma


def _fill(x_N: np.ndarray) -> np.ndarray | None:
    if not np.isfinite(x_N).any():
        return None
    return pd.Series(x_N).interpolate(limit_direction="both").to_numpy()


def _l2_costs(s1: np.ndarray, s2: np.ndarray, starts: np.ndarray, end: int) -> np.ndarray:
    """ruptures' "l2" cost (within-segment sum of squares) of the segments [start, end) from prefix sums:
    O(d) per segment, every candidate start at once."""
    total = s1[end] - s1[starts]
    return s2[end] - s2[starts] - np.einsum("ij,ij->i", total, total) / (end - starts)


def pelt(signal: np.ndarray, pen: float, min_size: int) -> list[int]:
    """Segment ends (the last is len(signal)) of ruptures.Pelt(model="l2", min_size, jump=1).predict(pen).

    The same recursion, admissible set and pruning as ruptures 1.1 (its list semantics included, so
    the result is the same), with every candidate's cost from prefix sums in one numpy call per
    step instead of a Python call per candidate: ~10x faster on thousands of steps.
    """
    x = signal.reshape(len(signal), -1).astype(float)
    n = len(x)
    if n < min_size:
        return [n]
    s1 = np.vstack([np.zeros(x.shape[1]), np.cumsum(x, 0)])
    s2 = np.concatenate([[0.0], np.cumsum((x * x).sum(1))])
    best = np.full(n + 1, np.nan)  # best[t]: the optimal penalised cost of signal[0:t]; NaN: no partition
    best[0] = 0.0
    parent = np.zeros(n + 1, np.int64)
    admissible: list[int] = []
    for end in [*range(min_size, n), n]:
        admissible.append(end - min_size)
        adm = np.asarray(admissible)
        starts = adm[~np.isnan(best[adm])]
        totals = best[starts] + (_l2_costs(s1, s2, starts, end) + pen)
        i = int(np.argmin(totals))  # the first minimum, as min() over the candidates in order
        best[end], parent[end] = totals[i], starts[i]
        # As ruptures: the i-th admissible point is kept by the i-th candidate's cost.
        admissible = adm[: len(starts)][totals <= best[end] + pen].tolist()
    ends, t = [], n
    while t > 0:
        ends.append(t)
        t = int(parent[t])
    return sorted(ends)


def change_points(series: LayerSeries, settings: Settings) -> list[int]:
    """Row indices where a new segment starts (PELT, l2 cost, BIC penalty; module docstring point 2)."""
    n, e = series.load_NE.shape
    if n < 2 * settings.min_segment:
        return []
    total_N = series.load_NE.sum(1, keepdims=True)
    log_util_NE = np.log((series.load_NE + 0.5) / (total_N / e + 0.5))
    groups = [_scaled([log_util_NE[:, i] for i in range(e)])]
    for x in (series.entropy_N, series.margin_N):
        filled = _fill(x)
        groups.append(_scaled([filled]) if filled is not None else None)
    signal = np.concatenate([g for g in groups if g is not None], 1) if any(g is not None for g in groups) else None
    if signal is None:
        return []
    pen = settings.penalty * (signal.shape[1] + 1) * math.log(n)
    return pelt(signal, pen, settings.min_segment)[:-1]


def _segment(series: LayerSeries, lo: int, hi: int) -> Segment:
    load_E = series.load_NE[lo:hi].sum(0).astype(float)
    e = load_E.size
    share_E = load_E / load_E.sum() if load_E.sum() > 0 else np.full(e, 1.0 / e)
    nz = share_E[share_E > 0]
    divergence = float(math.log(e) + (nz * np.log(nz)).sum())
    ent, mar = series.entropy_N[lo:hi], series.margin_N[lo:hi]
    return Segment(lo, hi, share_E * e, share_E, divergence,
                   float(np.nanmean(ent)) if np.isfinite(ent).any() else float("nan"),
                   float(np.nanmean(mar)) if np.isfinite(mar).any() else float("nan"))


def _collapsed_state(seg: Segment, k: int, settings: Settings) -> bool:
    e = seg.util_E.size
    return bool((seg.util_E < settings.starved).sum() >= e / 2 or seg.share_E.max() >= 0.9 / k)


def _evidence(before: Segment, now: Segment, settings: Settings) -> list[Evidence]:
    """Experts that became starved (fell ≥ 2×) or dominant (rose ≥ 1.5×) between `before` and `now`."""
    out = []
    for i in range(now.util_E.size):
        b, w = before.util_E[i], now.util_E[i]
        if w < settings.starved and b >= settings.starved and w <= 0.5 * b:
            role = "starved"
        elif w >= settings.dominant and b < settings.dominant and w >= 1.5 * b:
            role = "took_over"
        else:
            continue
        out.append(Evidence(i, role, float(before.share_E[i]), float("nan"), float(now.share_E[i])))
    return out


def _progress(before: Segment, segments: list[Segment], j: int, evidence: list[Evidence], horizon: int) -> float:
    """Largest fraction of an evidence expert's whole departure reached within `horizon` rows of change point j."""
    now = segments[-1]
    reached = [s for s in segments[j:] if s.lo < segments[j].lo + horizon][-1]
    best = 0.0
    for ev in evidence:
        b, w = before.util_E[ev.expert], now.util_E[ev.expert]
        best = max(best, float((reached.util_E[ev.expert] - b) / (w - b)))
    return best


def _moved_at(series: LayerSeries, before: Segment, after: Segment, evidence: list[Evidence]) -> bool:
    """Some evidence expert moves towards its final state from `before` to `after` by ≥ MOVE_Z standard errors."""
    util_NE = series.load_NE * series.load_NE.shape[1] / series.load_NE.sum(1, keepdims=True)
    for ev in evidence:
        sign = -1.0 if ev.role == "starved" else 1.0
        move = sign * (after.util_E[ev.expert] - before.util_E[ev.expert])
        # Noise from differences inside each segment (the mean is flat there), so a jump never inflates it.
        var = [np.mean(np.diff(util_NE[s.lo:s.hi, ev.expert]) ** 2) / 2 for s in (before, after)]
        se = math.sqrt(var[0] / (before.hi - before.lo) + var[1] / (after.hi - after.lo))
        if move > 0 and move >= MOVE_Z * se:
            return True
    return False


def _bucketed(series: LayerSeries, width: int) -> LayerSeries:
    """Consecutive steps summed (load) or averaged (entropy, margin) into buckets of `width` rows."""
    idx_N = np.arange(series.steps_N.size) // width
    load_BE = np.zeros((idx_N[-1] + 1, series.load_NE.shape[1]))
    np.add.at(load_BE, idx_N, series.load_NE)

    def mean(x_N):
        return pd.Series(x_N).groupby(idx_N).mean().to_numpy(dtype=float)
    return LayerSeries(series.layer, series.k, series.steps_N[::width], load_BE, mean(series.entropy_N),
                       mean(series.margin_N))


def _refine(series: LayerSeries, v: LayerVerdict, width: int) -> LayerVerdict:
    """Back to full rows: segment bounds scaled, the onset placed by the best single split of the evidence
    experts' log-utilisation within a bucket either side of the coarse onset."""
    n = series.steps_N.size
    for seg in {id(x): x for x in (*v.segments, v.baseline, v.after) if x is not None}.values():
        seg.lo, seg.hi = min(seg.lo * width, n), min(seg.hi * width, n)
    if v.onset_index is None:
        return v
    coarse = v.onset_index * width
    if v.baseline is None or not v.evidence:
        v.onset_index = coarse
        return v
    lo, hi = max(0, coarse - width), min(n, coarse + width)
    experts = [ev.expert for ev in v.evidence]
    total_N = series.load_NE[lo:hi].sum(1, keepdims=True)
    x_NE = np.log((series.load_NE[lo:hi, experts] + 0.5) / (total_N / series.load_NE.shape[1] + 0.5))
    c1 = np.vstack([np.zeros(len(experts)), np.cumsum(x_NE, 0)])
    c2 = np.concatenate([[0.0], np.cumsum((x_NE ** 2).sum(1))])
    m = hi - lo
    t = np.arange(1, m)
    sse = (c2[t] - (c1[t] ** 2).sum(1) / t) + (c2[m] - c2[t] - ((c1[m] - c1[t]) ** 2).sum(1) / (m - t))
    v.onset_index = lo + int(t[np.argmin(sse)]) if t.size else coarse
    return v


def judge(series: LayerSeries, settings: Settings | None = None) -> LayerVerdict:
    """Verdict, onset and evidence of one layer (module docstring points 3–5)."""
    settings = settings or Settings()
    n = series.load_NE.shape[0]
    if n > MAX_ROWS:
        width = math.ceil(n / MAX_ROWS)
        return _refine(series, _judge(_bucketed(series, width), settings), width)
    return _judge(series, settings)


def _judge(series: LayerSeries, settings: Settings) -> LayerVerdict:
    n = series.load_NE.shape[0]
    bounds = [0, *change_points(series, settings), n]
    segments = [_segment(series, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
    now = segments[-1]
    starved_now = [int(i) for i in np.flatnonzero(now.util_E < settings.starved)]
    dominant_now = [int(i) for i in np.flatnonzero(now.util_E >= settings.dominant)]
    collapsed_now = _collapsed_state(now, series.k, settings)
    candidates = []  # (progress within the horizon, j, evidence)
    for j in range(1, len(segments)):
        # The baseline is the segment before τ, extended back to 2·min_segment steps when shorter:
        # a few warm-up steps are no baseline, and early-training transients are no onset.
        lo = max((s.lo for s in segments[:j] if segments[j].lo - s.lo >= 2 * settings.min_segment), default=None)
        if lo is None:
            continue
        base = _segment(series, lo, segments[j].lo)
        if any(s.divergence <= base.divergence for s in segments[j:]):
            continue
        evidence = _evidence(base, now, settings)
        if evidence and _moved_at(series, base, segments[j], evidence):
            candidates.append((_progress(base, segments, j, evidence, settings.window), j, evidence, base))
    if candidates:
        fast = [c for c in candidates if c[0] >= ONSET_PROGRESS]
        _, j, evidence, base = fast[0] if fast else max(candidates, key=lambda c: (c[0], -c[1]))
        for ev in evidence:
            ev.share_after = float(segments[j].share_E[ev.expert])
        return LayerVerdict(series.layer, "collapsed" if collapsed_now else "collapsing", segments[j].lo, segments,
                            starved_now, dominant_now, evidence, base, segments[j])
    if collapsed_now and all(_collapsed_state(s, series.k, settings) for s in segments):
        evidence = [Evidence(i, "starved", float("nan"), float(segments[0].share_E[i]), float(now.share_E[i]))
                    for i in starved_now]
        evidence += [Evidence(i, "took_over", float("nan"), float(segments[0].share_E[i]), float(now.share_E[i]))
                     for i in np.flatnonzero(now.share_E >= 0.9 / series.k)]
        return LayerVerdict(series.layer, "collapsed", 0, segments, starved_now, dominant_now, evidence, None, segments[0])
    verdict = "imbalanced" if (starved_now or dominant_now) else "healthy"
    return LayerVerdict(series.layer, verdict, None, segments, starved_now, dominant_now)


# ------------------------------------------------------------------ reading the store

def resolve_phase(store, scope: Scope) -> Scope:
    """Training steps when the run has them: replays (phase 'eval') at checkpoint steps would zigzag the series."""
    if scope.phase is not None:
        return scope
    phases = store.sql("SELECT DISTINCT phase FROM expert_step", run=scope.run)["phase"].tolist()
    return Scope(**{**scope.__dict__, "phase": "train"}) if "train" in phases else scope


# Judged layers per (live expert_step and token_step segments, scope, settings): a page asks for the verdicts and
# their evidence in one refresh, and each fit reads every step of the run. Bounded in bytes of the series.
JUDGED = BoundedMemo(1 << 27)


def _judged(store, scope: Scope, meta: pd.DataFrame, settings: Settings) -> list[tuple[LayerSeries, LayerVerdict]]:
    key = (*segments_key(store, "expert_step", scope.run), *segments_key(store, "token_step", scope.run),
           dataclasses.replace(scope, by="step"), settings)
    found = JUDGED.get(key)
    if found is None:
        found = [(s, judge(s, settings)) for s in layer_series(store, scope, meta)]
        JUDGED.put(key, found, sum(s.load_NE.nbytes + 3 * s.steps_N.nbytes for s, _ in found))
    return found


def layer_series(store, scope: Scope, meta: pd.DataFrame) -> list[LayerSeries]:
    """Per-layer step series from the load (as load_share counts it), entropy and margin metrics (no SQL of its own)."""
    step_scope = Scope(**{**resolve_phase(store, scope).__dict__, "by": "step"})
    loads = balance.load_arrays(store, step_scope, meta)
    ent = health.entropy(store, step_scope, meta, quantiles=False)
    mar = health.margin(store, step_scope, meta, quantiles=False)
    k_of = dict(zip(meta.layer.astype(int), meta.k.astype(int)))
    ent_by, mar_by = dict(tuple(ent.groupby("layer"))), dict(tuple(mar.groupby("layer")))
    empty = pd.DataFrame({"step": [], "mean": []})
    out = []
    for layer in sorted(loads):
        steps, load_NE = loads[layer]
        e_mean = ent_by.get(layer, empty).set_index("step")["mean"].reindex(steps).to_numpy(dtype=float)
        m_mean = mar_by.get(layer, empty).set_index("step")["mean"].reindex(steps).to_numpy(dtype=float)
        out.append(LayerSeries(int(layer), int(k_of.get(int(layer), 1)), steps, load_NE, e_mean, m_mean))
    return out


def _step(series: LayerSeries, index: int | None):
    return int(series.steps_N[index]) if index is not None else None


def _summary(series: LayerSeries, v: LayerVerdict) -> str:
    if v.verdict in ("healthy", "imbalanced") and not (v.starved_now or v.dominant_now):
        return "balanced: no starved or dominant expert"
    parts = []
    for ev in v.evidence:
        verb = "starved" if ev.role == "starved" else "took over"
        before = "" if math.isnan(ev.share_before) else f"{ev.share_before:.3f} → "
        parts.append(f"expert {ev.expert} {verb} (share {before}{ev.share_now:.3f})")
    if v.verdict == "imbalanced":
        parts = [f"starved experts {v.starved_now}" if v.starved_now else "",
                 f"dominant experts {v.dominant_now}" if v.dominant_now else ""]
        return "imbalanced since the first recorded step, no onset: " + "; ".join(p for p in parts if p)
    onset = _step(series, v.onset_index)
    return f"{v.verdict} from step {onset}: " + "; ".join(parts)


def _layer_row(series: LayerSeries, v: LayerVerdict) -> dict:
    now = v.segments[-1]
    nan = float("nan")
    return {
        "layer": series.layer, "E": int(series.load_NE.shape[1]), "k": series.k, "verdict": v.verdict,
        "onset_step": _step(series, v.onset_index),
        "first_step": int(series.steps_N[0]), "last_step": int(series.steps_N[-1]), "steps": int(series.steps_N.size),
        "change_points": [int(series.steps_N[s.lo]) for s in v.segments[1:]],
        "evidence_experts": [ev.expert for ev in v.evidence],
        "evidence_roles": [ev.role for ev in v.evidence],
        "starved_now": v.starved_now, "dominant_now": v.dominant_now,
        "max_utilisation_now": float(now.util_E.max()),
        "divergence_before": v.baseline.divergence if v.baseline else nan,
        "divergence_now": now.divergence,
        "entropy_before": v.baseline.entropy if v.baseline else nan,
        "entropy_after": v.after.entropy if v.after else nan,
        "margin_before": v.baseline.margin if v.baseline else nan,
        "margin_after": v.after.margin if v.after else nan,
        "entropy_now": now.entropy, "margin_now": now.margin,
        "summary": _summary(series, v),
    }


def _evidence_rows(series: LayerSeries, v: LayerVerdict, settings: Settings) -> list[dict]:
    rows = []
    if v.onset_index is None:
        return rows
    lo = max(0, v.onset_index - settings.window)
    hi = min(series.steps_N.size, v.onset_index + settings.window + 1)
    total_N = series.load_NE[lo:hi].sum(1)
    for ev in v.evidence:
        rows.append({
            "layer": series.layer, "expert": ev.expert, "role": ev.role, "verdict": v.verdict,
            "onset_step": _step(series, v.onset_index),
            "share_before": ev.share_before, "share_after": ev.share_after, "share_now": ev.share_now,
            "uniform": 1.0 / series.load_NE.shape[1],
            "trajectory_steps": series.steps_N[lo:hi].tolist(),
            "trajectory_share": (series.load_NE[lo:hi, ev.expert] / total_N).tolist(),
        })
    return rows


def _step_rows(series: LayerSeries, v: LayerVerdict) -> pd.DataFrame:
    total_N = series.load_NE.sum(1)
    share_NE = series.load_NE / total_N[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        divergence_N = math.log(share_NE.shape[1]) + np.nansum(np.where(share_NE > 0, share_NE * np.log(share_NE), 0), 1)
    segment_N = np.zeros(series.steps_N.size, dtype=np.int64)
    fitted_N = np.zeros(series.steps_N.size)
    for i, s in enumerate(v.segments):
        segment_N[s.lo:s.hi] = i
        fitted_N[s.lo:s.hi] = s.divergence
    onset = v.onset_index if v.onset_index is not None else series.steps_N.size
    return pd.DataFrame({
        "step": series.steps_N, "layer": series.layer, "divergence": divergence_N,
        "max_utilisation": share_NE.max(1) * share_NE.shape[1], "entropy": series.entropy_N, "margin": series.margin_N,
        "segment": segment_N, "segment_divergence": fitted_N, "after_onset": np.arange(series.steps_N.size) >= onset,
    })


LAYER_COLUMNS = ["layer", "E", "k", "verdict", "onset_step", "first_step", "last_step", "steps", "change_points",
                 "evidence_experts", "evidence_roles", "starved_now", "dominant_now", "max_utilisation_now",
                 "divergence_before", "divergence_now", "entropy_before", "entropy_after", "margin_before",
                 "margin_after", "entropy_now", "margin_now", "summary"]
EVIDENCE_COLUMNS = ["layer", "expert", "role", "verdict", "onset_step", "share_before", "share_after", "share_now",
                    "uniform", "trajectory_steps", "trajectory_share"]
STEP_COLUMNS = ["step", "layer", "divergence", "max_utilisation", "entropy", "margin", "segment", "segment_divergence",
                "after_onset"]


def collapse(store, scope: Scope, meta: pd.DataFrame, detail: str = "layers", starved: float = 0.1,
             dominant: float = 2.0, penalty: float = 1.0, min_segment: int = 3, window: int = 20,
             **options) -> pd.DataFrame:
    """Collapse verdict per layer — healthy / imbalanced / collapsing / collapsed — with onset step and evidence.

    Definition and sources: the module docstring of moescope.analysis.collapse (PELT change
    points, Killick et al. 2012, on load shares, entropy and margin; starved u_i < 0.1 per
    METRICS.md §5; dominant u_i ≥ 2, i.e. MaxVio ≥ 1). Training rows only when the run has
    them (phase="..." picks another).
    by="window", detail="layers" (default): one row per layer: layer, E, k, verdict,
      onset_step (<NA> unless collapsing/collapsed), first_step, last_step, steps,
      change_points (steps that start a new segment), evidence_experts, evidence_roles
      ("starved" / "took_over"), starved_now, dominant_now, max_utilisation_now,
      divergence_before / divergence_now (KL of load from uniform, nats), entropy_before /
      entropy_after and margin_before / margin_after (segment means either side of the
      onset), entropy_now, margin_now, summary (one sentence).
    detail="evidence": one row per evidence expert: layer, expert, role, verdict, onset_step,
      share_before, share_after (the segment after the onset), share_now, uniform,
      trajectory_steps / trajectory_share (per step, `window` steps either side of the onset).
    by="step": per step and layer: divergence, max_utilisation, entropy, margin, segment,
      segment_divergence (the fitted piecewise level) and after_onset, for charts.
    Options: starved, dominant (utilisation thresholds), penalty (BIC multiplier),
    min_segment (steps), window (steps).
    """
    check_options("collapse", options, set())
    if detail not in DETAILS:
        raise ValueError(f"detail must be one of {list(DETAILS)}, got {detail!r}")
    settings = Settings(starved=starved, dominant=dominant, penalty=penalty, min_segment=min_segment, window=window)
    results = _judged(store, scope, meta, settings)
    if scope.by == "step":
        frames = [_step_rows(s, v) for s, v in results]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=STEP_COLUMNS)
    if detail == "evidence":
        return pd.DataFrame([r for s, v in results for r in _evidence_rows(s, v, settings)], columns=EVIDENCE_COLUMNS)
    df = pd.DataFrame([_layer_row(s, v) for s, v in results], columns=LAYER_COLUMNS)
    return df.astype({"onset_step": "Int64"})  # <NA> where there is no onset
