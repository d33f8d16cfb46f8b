"""What every metric shares: argument checks, the layer table, and SQL filter fragments.

Metrics run as SQL over the store's DuckDB views (routing, token_stats, expert_step);
nothing here opens a connection. Layer sizes (E, k) come from the store's `layers`
table, or from the data itself when a run never registered them.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from moescope.analysis.memo import BoundedMemo, segments_key

BY_VALUES = ("step", "window")


@dataclass(frozen=True)
class Scope:
    """The slice of a run a metric is asked about."""

    run: str
    layers: tuple[int, ...] | None = None
    steps: tuple[int, int] | None = None
    checkpoint: str | None = None
    phase: str | None = None
    by: str = "step"
    ranks: tuple[int, ...] | None = None  # None: every rank (the rows of all ranks are summed)

    def where(self, *, alias: str = "", checkpoint: bool = True) -> tuple[str, list]:
        """SQL WHERE body and its parameters for this scope (layers are validated ints, inlined)."""
        a = f"{alias}." if alias else ""
        parts, params = ["TRUE"], []
        if self.layers is not None:
            parts.append(f"{a}layer IN ({', '.join(str(int(x)) for x in self.layers)})" if self.layers else "FALSE")
        if self.steps is not None:
            parts.append(f"{a}step BETWEEN ? AND ?")
            params += [int(self.steps[0]), int(self.steps[1])]
        if checkpoint and self.checkpoint is not None:
            parts.append(f"{a}checkpoint = ?")
            params.append(self.checkpoint)
        if self.phase is not None:
            parts.append(f"{a}phase = ?")
            params.append(self.phase)
        if self.ranks is not None:
            parts.append(f"{a}rank IN ({', '.join(str(int(r)) for r in self.ranks)})" if self.ranks else "FALSE")
        return " AND ".join(parts), params

    @property
    def step_key(self) -> str:
        """Grouping columns before layer: per step, or none for the whole window."""
        return "step, " if self.by == "step" else ""


def make_scope(run, layers=None, steps=None, checkpoint=None, by="step", phase=None, ranks=None) -> Scope:
    """Validate the common arguments; ValueError with one line naming what is wrong."""
    if not isinstance(run, str) or not run:
        raise ValueError(f"run must be a non-empty string, got {run!r}")
    layers = _int_set("layers", layers)
    ranks = _int_set("ranks", ranks)
    if steps is not None:
        if (not isinstance(steps, (tuple, list)) or len(steps) != 2 or not all(_is_int(s) for s in steps)):
            raise ValueError(f"steps must be a (lo, hi) pair of ints, inclusive, got {steps!r}")
        if int(steps[0]) > int(steps[1]):
            raise ValueError(f"steps must have lo <= hi, got {tuple(steps)!r}")
        steps = (int(steps[0]), int(steps[1]))
    if checkpoint is not None and not isinstance(checkpoint, str):
        raise ValueError(f"checkpoint must be a string, got {checkpoint!r}")
    if by not in BY_VALUES:
        raise ValueError(f"by must be one of {list(BY_VALUES)}, got {by!r}")
    if phase is not None and not isinstance(phase, str):
        raise ValueError(f"phase must be a string, got {phase!r}")
    return Scope(run=run, layers=layers, steps=steps, checkpoint=checkpoint, phase=phase, by=by, ranks=ranks)


def _int_set(name: str, values) -> tuple[int, ...] | None:
    """None, one int or an iterable of ints -> sorted distinct ints; ValueError naming `name` otherwise."""
    if values is None:
        return None
    if _is_int(values):
        values = [values]
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) and not hasattr(values, "__iter__"):
        raise ValueError(f"{name} must be a list of ints, got {values!r}")
    values = list(values)
    if not all(_is_int(x) for x in values):
        raise ValueError(f"{name} must be a list of ints, got {values!r}")
    return tuple(sorted({int(x) for x in values}))


def _is_int(x) -> bool:
    return not isinstance(x, bool) and hasattr(x, "__index__")


def layer_meta(store, run: str) -> pd.DataFrame:
    """Columns layer, E (num_experts), k (top_k) for every layer of the run.

    Registered layers win; layers only seen in the data get E = max expert + 1 and
    k = most slots seen, so a run recorded without metadata still gets metrics.
    """
    reg = store.layers(run)
    meta = {int(r.layer): (int(r.num_experts), int(r.top_k)) for r in reg.itertuples()}
    seen = _seen_layers(store, run)
    for r in seen.itertuples():
        meta.setdefault(int(r.layer), (int(r.E), max(1, int(round(r.k)))))
    if not meta:
        seen = store.sql("SELECT layer, max(expert) + 1 AS E, max(slot) + 1 AS k FROM routing GROUP BY layer", run=run)
        for r in seen.itertuples():
            meta.setdefault(int(r.layer), (int(r.E), int(r.k)))
    rows = sorted((layer, e, k) for layer, (e, k) in meta.items())
    return pd.DataFrame(rows, columns=["layer", "E", "k"]).astype({"layer": "int64", "E": "int64", "k": "int64"})


# Layer sizes seen in expert_step, per (store, run, live expert_step segments): every metric
# asks for them and segments never change under their name, so a new segment is a new key.
_SEEN_LAYERS = BoundedMemo(max_size=256)


def _seen_layers(store, run: str) -> pd.DataFrame:
    key = segments_key(store, "expert_step", run)
    seen = _SEEN_LAYERS.get(key)
    if seen is None:
        # k from expert_step: Σ_i tokens_i / T, T being num_tokens (repeated on each expert row).
        seen = store.sql("SELECT layer, max(expert) + 1 AS E, sum(tokens) / greatest(max(nt), 1) AS k FROM ("
                         " SELECT layer, expert, sum(tokens) AS tokens, sum(num_tokens) AS nt FROM expert_step"
                         " GROUP BY layer, expert) GROUP BY layer", run=run)
        _SEEN_LAYERS.put(key, seen, 1)
    return seen


def run_ranks(store, run: str) -> list[int]:
    """The ranks that recorded expert load in the run, ascending."""
    return [int(r) for r in store.sql("SELECT DISTINCT rank FROM expert_step ORDER BY 1", run=run)["rank"]]


def meta_cte(meta: pd.DataFrame, scope: Scope) -> str:
    """A `meta(layer, E, k)` CTE body inlined from validated ints (views take no parameters)."""
    rows = [r for r in meta.itertuples() if scope.layers is None or r.layer in scope.layers]
    if not rows:
        return "SELECT * FROM (VALUES (0, 1, 1)) AS m(layer, E, k) WHERE FALSE"
    values = ", ".join(f"({int(r.layer)}, {int(r.E)}, {int(r.k)})" for r in rows)
    return f"SELECT * FROM (VALUES {values}) AS m(layer, E, k)"


def expert_load_sql(scope: Scope, meta: pd.DataFrame, *, column: str = "tokens") -> tuple[str, list]:
    """CTEs `meta`, `agg` and `load`: per (step?, layer, expert) the summed `column`, every expert present.

    `load` has columns [step,] layer, expert, E, k, load, top1, prob, dropped, T, where T
    is the tokens the layer saw (num_tokens repeats on every expert row of a frame, so
    the per-expert sum is T and the max over experts guards against missing rows).
    """
    where, params = scope.where()
    sk = scope.step_key
    sql = f"""
    WITH meta AS ({meta_cte(meta, scope)}),
    agg AS (
        SELECT {sk} layer, expert, sum({column}) AS load, sum(top1) AS top1, sum(prob_sum) AS prob,
               sum(dropped) AS dropped, sum(num_tokens) AS nt
        FROM expert_step WHERE {where} GROUP BY ALL
    ),
    groups AS (SELECT DISTINCT {sk} layer FROM agg),
    grid AS (
        SELECT {sk} g.layer, unnest(range(m.E)) AS expert, m.E, m.k FROM groups g JOIN meta m USING (layer)
    ),
    load AS (
        SELECT {"g.step, " if sk else ""} g.layer, g.expert, g.E, g.k,
               coalesce(a.load, 0)::DOUBLE AS load, coalesce(a.top1, 0)::DOUBLE AS top1,
               coalesce(a.prob, 0)::DOUBLE AS prob, coalesce(a.dropped, 0)::DOUBLE AS dropped,
               max(coalesce(a.nt, 0)) OVER (PARTITION BY {"g.step, " if sk else ""} g.layer)::DOUBLE AS T
        FROM grid g LEFT JOIN agg a ON a.layer = g.layer AND a.expert = g.expert {"AND a.step = g.step" if sk else ""}
    )
    """
    return sql, params


def token_key(alias: str = "") -> str:
    """Columns that identify one token within a run (one row per layer in token_stats)."""
    a = f"{alias}." if alias else ""
    return ", ".join(f"{a}{c}" for c in ("checkpoint", "step", "rank", "microbatch", "seq", "pos"))


def check_options(name: str, options: dict, allowed: set[str]) -> None:
    extra = sorted(set(options) - allowed)
    if extra:
        raise ValueError(f"metric {name!r} does not take option(s) {extra}; it takes {sorted(allowed) or 'none'}")
