"""Capture validator: the invariants every recorded run must keep (`moescope validate RUN`).

Serving engines' capture paths have shipped all-zero rows, misaligned token spans and
overwritten layers; these checks find such captures in recorded data. A token is
(checkpoint, step, rank, microbatch, phase, seq, pos); its rows are per MoE layer.

  assignments   per token and layer, k routing rows (one per slot); per (step, layer) in
                expert_step, Σ_i tokens_i = T·k. Token-choice layers only (an expert-choice
                router gives a token 0..E experts).
  expert_ids    every expert id within [0, E) of its layer (routing and expert_step).
  duplicates    no (token, layer, slot) twice in routing, no (token, layer) twice in
                token_stats, and no expert twice among one token's slots (all-zero rows).
  weights       finite gate weights, non-zero on slots that were computed, and summing to
                one per token (tokens with a dropped slot aside: their applied weight is 0)
                where the router renormalises: known from the layer's router_kind, else
                inferred per layer (renormalising when ≥ 90% of its tokens sum to one).
  expert_step   expert_step's exact per-expert counts (tokens, dropped) equal counting the
                routing rows, in every (step, layer) whose per-token rows were not sampled
                (its token_stats rows number T).
  positions     positions of each sequence are contiguous (no gaps), in both tables.
  token_ids     one token id per token across layers and tables (aligned token spans).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from moescope.analysis.query import Scope, layer_meta, meta_cte

WEIGHT_TOLERANCE = 1e-3
RENORMALISE_SHARE = 0.9
# router_kind fragments whose weights sum to one by construction, and whose weights never do.
RENORMALISING_KINDS = ("topk-softmax",)
UNNORMALISED_KINDS = ("expert_choice", "unnormalised", "group-topk", "zero-experts", "switch-top1")

_TOKEN = "checkpoint, step, rank, microbatch, coalesce(phase, '') AS phase, seq, pos"
_TOKEN_KEY = "checkpoint, step, rank, microbatch, phase, seq, pos"
_STEP = "checkpoint, step, rank, coalesce(phase, '') AS phase"
_STEP_KEY = "checkpoint, step, rank, phase"


@dataclass
class Check:
    name: str
    description: str
    violations: int = 0
    examples: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.violations == 0


@dataclass
class Validation:
    run: str
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame([{"check": c.name, "ok": c.ok, "violations": c.violations, "description": c.description,
                              "examples": c.examples, "notes": c.notes} for c in self.checks])

    def text(self) -> str:
        failed = [c for c in self.checks if not c.ok]
        lines = [f"validate {self.run}: {len(self.checks)} checks, "
                 + (f"{len(failed)} failed" if failed else "all passed")]
        for c in self.checks:
            lines.append(f"{'PASS' if c.ok else 'FAIL'} {c.name:<12} {c.violations:>8} violation(s)  {c.description}")
            lines += [f"     note: {n}" for n in c.notes]
            lines += [f"     e.g. {_fmt(e)}" for e in c.examples]
        return "\n".join(lines)


def _fmt(example: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in example.items())


def _plain(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v.item() if isinstance(v, np.generic) else v


def _examples(df: pd.DataFrame, limit: int) -> list[dict]:
    return [{k: _plain(v) for k, v in row.items()} for row in df.head(limit).to_dict("records")]


class _Run:
    """The run's layers and the store, with one helper per query shape."""

    def __init__(self, store, run: str):
        self.store, self.run = store, run
        self.meta = layer_meta(store, run)
        kinds = store.layers(run)
        self.kind = {int(r.layer): str(r.router_kind) for r in kinds.itertuples()}
        self.meta_sql = meta_cte(self.meta, Scope(run=run))
        self.choice = sorted(layer for layer, kind in self.kind.items() if "expert_choice" in kind)

    def sql(self, query: str, params=None) -> pd.DataFrame:
        return self.store.sql(f"WITH meta AS ({self.meta_sql}) " + query, params, run=self.run)

    def token_choice(self, alias: str = "") -> str:
        a = f"{alias}." if alias else ""
        return f"{a}layer NOT IN ({', '.join(map(str, self.choice))})" if self.choice else "TRUE"


def _count_and_examples(r: _Run, query: str, limit: int) -> tuple[int, list[dict]]:
    n = int(r.sql(f"SELECT count(*) AS n FROM ({query})")["n"].iloc[0])
    return n, (_examples(r.sql(f"SELECT * FROM ({query}) LIMIT {int(limit)}"), limit) if n else [])


def check_assignments(r: _Run, limit: int) -> Check:
    c = Check("assignments", "per-layer assignments = tokens × k")
    per_token = f"""
        SELECT {_TOKEN_KEY}, layer, coalesce(rows, 0) AS rows, m.k AS expected, has_stats
        FROM (SELECT DISTINCT {_TOKEN}, layer, TRUE AS has_stats FROM token_stats)
        FULL OUTER JOIN (SELECT {_TOKEN}, layer, count(*) AS rows FROM routing GROUP BY ALL)
            USING (checkpoint, step, rank, microbatch, phase, seq, pos, layer)
        JOIN meta m USING (layer)
        WHERE {r.token_choice()} AND (coalesce(rows, 0) <> m.k OR has_stats IS NULL)"""
    n, ex = _count_and_examples(r, per_token, limit)
    totals = f"""
        SELECT {_STEP_KEY}, layer, sum(tokens)::BIGINT AS assignments, max(nt)::BIGINT * any_value(m.k) AS expected
        FROM (SELECT {_STEP}, layer, expert, sum(tokens) AS tokens, sum(num_tokens) AS nt FROM expert_step GROUP BY ALL)
        JOIN meta m USING (layer) WHERE {r.token_choice()}
        GROUP BY ALL HAVING sum(tokens) <> max(nt) * any_value(m.k)"""
    n2, ex2 = _count_and_examples(r, totals, limit)
    c.violations, c.examples = n + n2, (ex + [{"table": "expert_step", **e} for e in ex2])[:limit]
    if n:
        c.notes.append(f"{n} token(s) whose routing rows are not k (or have no token_stats row)")
    if n2:
        c.notes.append(f"{n2} (step, layer) group(s) in expert_step whose assignments are not T·k")
    if r.choice:
        c.notes.append(f"expert-choice layers {r.choice} not checked (a token gets 0..E experts)")
    return c


def check_expert_ids(r: _Run, limit: int) -> Check:
    c = Check("expert_ids", "expert ids within [0, E)")
    q = """
        SELECT 'routing' AS "table", layer, expert, m.E, step, seq, pos, slot FROM routing JOIN meta m USING (layer)
        WHERE expert < 0 OR expert >= m.E
        UNION ALL
        SELECT 'expert_step', layer, expert, m.E, step, NULL, NULL, NULL FROM expert_step JOIN meta m USING (layer)
        WHERE expert < 0 OR expert >= m.E"""
    c.violations, c.examples = _count_and_examples(r, q, limit)
    unregistered = sorted(set(r.meta.layer.astype(int)) - set(r.kind))
    if unregistered:
        c.notes.append(f"layers {unregistered} are not registered: E taken from the data")
    return c


def check_duplicates(r: _Run, limit: int) -> Check:
    c = Check("duplicates", "no duplicate (token, layer, slot); no expert twice in one token")
    q = f"""
        SELECT 'routing slot' AS what, {_TOKEN_KEY}, layer, slot, NULL AS expert, count(*) AS copies
        FROM (SELECT {_TOKEN}, layer, slot FROM routing) GROUP BY ALL HAVING count(*) > 1
        UNION ALL
        SELECT 'token_stats row', {_TOKEN_KEY}, layer, NULL, NULL, count(*)
        FROM (SELECT {_TOKEN}, layer FROM token_stats) GROUP BY ALL HAVING count(*) > 1
        UNION ALL
        SELECT 'repeated expert', {_TOKEN_KEY}, layer, NULL, expert, count(*)
        FROM (SELECT {_TOKEN}, layer, expert FROM routing) GROUP BY ALL HAVING count(*) > 1"""
    c.violations, c.examples = _count_and_examples(r, q, limit)
    return c


def _renormalising_layers(r: _Run, tol: float) -> tuple[list[int], list[str]]:
    shares = r.sql(f"""
        SELECT layer, count(*) AS tokens, count(*) FILTER (WHERE abs(w - 1) <= {tol}) AS near_one FROM (
            SELECT {_TOKEN_KEY}, layer, sum(weight) AS w FROM (SELECT {_TOKEN}, layer, weight, dropped FROM routing)
            GROUP BY ALL HAVING NOT bool_or(dropped)) GROUP BY layer ORDER BY layer""")
    layers, notes = [], []
    for row in shares.itertuples():
        layer, kind = int(row.layer), r.kind.get(int(row.layer), "")
        if any(f in kind for f in UNNORMALISED_KINDS):
            continue
        if any(f in kind for f in RENORMALISING_KINDS):
            layers.append(layer)
            notes.append(f"layer {layer}: router kind {kind!r} renormalises")
        elif row.tokens and row.near_one / row.tokens >= RENORMALISE_SHARE:
            layers.append(layer)
            notes.append(f"layer {layer}: renormalises ({row.near_one / row.tokens:.1%} of tokens sum to one; "
                         f"kind {kind or 'unregistered'!r})")
    return layers, notes


def check_weights(r: _Run, limit: int, tol: float) -> Check:
    c = Check("weights", "finite gate weights, non-zero where computed, summing to one where renormalised")
    imported = (r.store.run_config(r.run).get("import") or {})
    if imported.get("weights_known") is False:  # serving engines return expert ids only
        c.notes.append(f"gate weights were not recorded ({imported.get('engine', 'import')} capture): not checked")
        return c
    layers, c.notes = _renormalising_layers(r, tol)
    renorm = f"layer IN ({', '.join(map(str, layers))})" if layers else "FALSE"
    q = f"""
        SELECT 'not finite' AS what, {_TOKEN_KEY}, layer, slot, weight AS value
        FROM (SELECT {_TOKEN}, layer, slot, weight FROM routing) WHERE NOT isfinite(weight)
        UNION ALL
        SELECT 'zero on a computed slot', {_TOKEN_KEY}, layer, slot, weight
        FROM (SELECT {_TOKEN}, layer, slot, weight, dropped FROM routing) WHERE weight = 0 AND NOT dropped
        UNION ALL
        SELECT 'sum is not one', {_TOKEN_KEY}, layer, NULL, w FROM (
            SELECT {_TOKEN_KEY}, layer, sum(weight) AS w FROM (SELECT {_TOKEN}, layer, weight, dropped FROM routing)
            WHERE {renorm} GROUP BY ALL HAVING NOT bool_or(dropped) AND abs(sum(weight) - 1) > {tol})"""
    c.violations, c.examples = _count_and_examples(r, q, limit)
    return c


def check_expert_step(r: _Run, limit: int) -> Check:
    c = Check("expert_step", "expert_step equals counting routing rows (unsampled steps)")
    keys = f"{_STEP_KEY}, layer"
    base = f"""
        es AS (SELECT {_STEP}, layer, expert, sum(tokens) AS tokens, sum(dropped) AS dropped, sum(num_tokens) AS nt
               FROM expert_step GROUP BY ALL),
        groups AS (SELECT {keys}, max(nt) AS T FROM es GROUP BY ALL),
        ts AS (SELECT {_STEP}, layer, count(*) AS n FROM token_stats GROUP BY ALL),
        complete AS (SELECT g.* FROM groups g JOIN ts USING ({keys}) WHERE ts.n >= g.T),
        rc AS (SELECT {_STEP}, layer, expert, count(*) AS tokens, count(*) FILTER (WHERE dropped) AS dropped
               FROM routing GROUP BY ALL)"""
    q = f"""WITH {base.strip()}
        SELECT {keys}, expert, coalesce(es.tokens, 0)::BIGINT AS recorded, coalesce(rc.tokens, 0)::BIGINT AS counted,
               coalesce(es.dropped, 0)::BIGINT AS recorded_dropped, coalesce(rc.dropped, 0)::BIGINT AS counted_dropped
        FROM es FULL OUTER JOIN rc USING ({keys}, expert) SEMI JOIN complete USING ({keys})
        WHERE coalesce(es.tokens, 0) <> coalesce(rc.tokens, 0) OR coalesce(es.dropped, 0) <> coalesce(rc.dropped, 0)"""
    c.violations, c.examples = _count_and_examples(r, q, limit)
    sampled = r.sql(f", {base.strip()} SELECT (SELECT count(*) FROM groups) AS total, (SELECT count(*) FROM complete) AS full")
    total, full = int(sampled.total.iloc[0]), int(sampled.full.iloc[0])
    if full < total:
        c.notes.append(f"{total - full} of {total} (step, layer) groups have sampled per-token rows: not compared")
    return c


def check_positions(r: _Run, limit: int) -> Check:
    c = Check("positions", "contiguous positions per sequence")
    parts = [f"""
        SELECT '{table}' AS "table", {_TOKEN_KEY.replace(', pos', '')}, layer, min(pos) AS first_pos, max(pos) AS last_pos,
               count(DISTINCT pos) AS positions
        FROM (SELECT {_TOKEN}, layer FROM {table}) GROUP BY ALL HAVING max(pos) - min(pos) + 1 <> count(DISTINCT pos)"""
             for table in ("token_stats", "routing")]
    c.violations, c.examples = _count_and_examples(r, " UNION ALL ".join(parts), limit)
    return c


def check_token_ids(r: _Run, limit: int) -> Check:
    c = Check("token_ids", "one token id per token across layers and tables")
    q = f"""
        SELECT {_TOKEN_KEY}, count(DISTINCT token_id) AS ids, list(DISTINCT token_id) AS token_ids FROM (
            SELECT {_TOKEN}, token_id FROM token_stats UNION ALL SELECT {_TOKEN}, token_id FROM routing)
        GROUP BY ALL HAVING count(DISTINCT token_id) > 1"""
    c.violations, c.examples = _count_and_examples(r, q, limit)
    return c


def validate_run(store, run: str, *, examples: int = 3, weight_tolerance: float = WEIGHT_TOLERANCE) -> Validation:
    """Run every check on one run; UnknownRun for a run the store does not hold."""
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 0:
        raise ValueError(f"examples must be a non-negative int, got {examples!r}")
    if isinstance(weight_tolerance, bool) or not isinstance(weight_tolerance, (int, float)) or not 0 < weight_tolerance < 1:
        raise ValueError(f"weight_tolerance must be a number in (0, 1), got {weight_tolerance!r}")
    store.require_run(run)
    r = _Run(store, run)
    return Validation(run, [
        check_assignments(r, examples), check_expert_ids(r, examples), check_duplicates(r, examples),
        check_weights(r, examples, float(weight_tolerance)), check_expert_step(r, examples), check_positions(r, examples),
        check_token_ids(r, examples),
    ])
