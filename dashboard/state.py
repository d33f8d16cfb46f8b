"""A page's state as it travels in the URL query string, so every view can be bookmarked and shared.

    ?runs=a,b&checkpoint=ck-3&layer=5&step_min=100&step_max=900&smoothing=0.6&ranks=0,3

Parsing is lenient and never raises: a malformed value is dropped and named in the
returned problems, which the page shows above its charts. Whether a run exists is
checked against the store by the page callbacks, not here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from urllib.parse import urlencode

from moescope.schema import SchemaError, check_run_id

# Steps are int64 in the record; DuckDB BIGINT cannot hold more.
STEP_LIMIT = 2**62
MAX_RUNS = 8  # overlaid runs: beyond this a chart is unreadable
SMOOTHING_MAX = 0.999
RANK_LIMIT = 2**31 - 1  # rank is int32 in the record
MAX_RANKS = 1024
KEYS = ("runs", "checkpoint", "checkpoint_b", "layer", "step_min", "step_max", "smoothing", "ranks")


@dataclass
class ViewState:
    runs: list[str] = field(default_factory=list)
    checkpoint: str | None = None
    checkpoint_b: str | None = None
    layer: int | None = None
    step_min: int | None = None
    step_max: int | None = None
    smoothing: float = 0.0
    ranks: list[int] = field(default_factory=list)  # empty: every rank

    @property
    def run(self) -> str | None:
        return self.runs[0] if self.runs else None

    @property
    def steps(self) -> tuple[int, int] | None:
        """The (lo, hi) window for compute_metric, open ends filled in; None for the whole run."""
        if self.step_min is None and self.step_max is None:
            return None
        return (-STEP_LIMIT if self.step_min is None else self.step_min,
                STEP_LIMIT if self.step_max is None else self.step_max)


def first_value(value) -> str | None:
    if isinstance(value, (list, tuple)):  # a key repeated in the URL: the last one wins
        value = value[-1] if value else None
    if value is None:
        return None
    value = str(value).strip()
    return value or None


def parse_runs(value, problems: list[str]) -> list[str]:
    values = value if isinstance(value, (list, tuple)) else [value]
    runs: list[str] = []
    for part in (p.strip() for v in values if v for p in str(v).split(",")):
        if not part:
            continue
        try:
            check_run_id(part)
        except SchemaError:
            problems.append(f"ignored run {part[:80]!r}: not a valid run id")
            continue
        if part not in runs:
            runs.append(part)
    if len(runs) > MAX_RUNS:
        problems.append(f"showing the first {MAX_RUNS} of {len(runs)} runs")
        runs = runs[:MAX_RUNS]
    return runs


def parse_int(name: str, value, problems: list[str], *, lo: int = -STEP_LIMIT, hi: int = STEP_LIMIT) -> int | None:
    text = first_value(value)
    if text is None:
        return None
    try:
        number = float(text)
    except ValueError:
        problems.append(f"ignored {name}={text[:40]!r}: not an integer")
        return None
    if not math.isfinite(number) or number != int(number):
        problems.append(f"ignored {name}={text[:40]!r}: not an integer")
        return None
    if not lo <= int(number) <= hi:
        problems.append(f"ignored {name}={text[:40]!r}: outside {lo}..{hi}")
        return None
    return int(number)


def parse_smoothing(value, problems: list[str]) -> float:
    text = first_value(value)
    if text is None:
        return 0.0
    try:
        weight = float(text)
    except ValueError:
        problems.append(f"ignored smoothing={text[:40]!r}: not a number")
        return 0.0
    if not math.isfinite(weight) or not 0.0 <= weight <= SMOOTHING_MAX:
        problems.append(f"ignored smoothing={text[:40]!r}: must be between 0 and {SMOOTHING_MAX}")
        return 0.0
    return weight


def parse_ranks(value, problems: list[str]) -> list[int]:
    """'0,3' (or the key repeated) -> [0, 3]; parts that are not ranks are named in problems."""
    values = value if isinstance(value, (list, tuple)) else [value]
    parts = [p.strip() for v in values if v not in (None, "") for p in str(v).split(",") if p.strip()]
    if len(parts) > MAX_RANKS:
        problems.append(f"ignored the rank filter: more than {MAX_RANKS} ranks")
        return []
    ranks = {parse_int("ranks", part, problems, lo=0, hi=RANK_LIMIT) for part in parts}
    return sorted(r for r in ranks if r is not None)


def parse(query: dict) -> tuple[ViewState, list[str]]:
    """ViewState from the query parameters Dash pages hand a layout, plus the problems found."""
    problems: list[str] = []
    runs = parse_runs(query.get("runs", query.get("run")), problems)
    layer = parse_int("layer", query.get("layer"), problems, lo=0, hi=1_000_000)
    step_min = parse_int("step_min", query.get("step_min"), problems)
    step_max = parse_int("step_max", query.get("step_max"), problems)
    if step_min is not None and step_max is not None and step_min > step_max:
        problems.append(f"ignored the step window {step_min}..{step_max}: step_min is after step_max")
        step_min = step_max = None
    state = ViewState(runs=runs, checkpoint=first_value(query.get("checkpoint")), checkpoint_b=first_value(query.get("checkpoint_b")),
                      layer=layer, step_min=step_min, step_max=step_max,
                      smoothing=parse_smoothing(query.get("smoothing"), problems),
                      ranks=parse_ranks(query.get("ranks"), problems))
    return state, problems


def search(**values) -> str:
    """A query string (with its leading '?') from the non-empty values, lists joined by commas."""
    pairs = []
    for key, value in values.items():
        if value is None or value == "" or value == [] or (key == "smoothing" and not value):
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        pairs.append((key, str(value)))
    return "?" + urlencode(pairs) if pairs else ""
