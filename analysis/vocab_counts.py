"""Per-id routing counts of a whole run, read once per routing segment (vocabulary specialisation).

Counting (layer, token id, expert) over every routing row is one high-cardinality GROUP
BY over the run: seconds at 100M rows, and the Specialisation page asks again on every
refresh. Segments never change under their name (collector.store), so the counts of the
segments already read are kept and a growing run reads only its new segments. A retired
segment (compaction, deletion) starts the count again.
"""
from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd

from moescope.analysis.memo import BoundedMemo
from moescope.collector.store import sql_list

# (store, run, row filter) -> (segments counted, counts); bounded in counted (layer, id, expert) rows.
KEPT = BoundedMemo(1 << 24)


def whole_run_counts(store, run: str, where: str, params: list) -> pd.DataFrame | None:
    """Columns layer, x (token id ≥ 0), expert, routed (rows), top1 (slot-0 rows) over the rows matching `where`.

    `where` must not filter steps (counts are per whole segment). None when a segment
    cannot be read directly; the caller then counts through the store's views.
    """
    files = store.segment_paths("routing", run)
    key = (str(store.root), run, where, tuple(params))
    covered, counts = KEPT.get(key) or (frozenset(), None)
    if not covered <= set(files):
        covered, counts = frozenset(), None
    todo = [f for f in files if f not in covered]
    if todo or counts is None:
        try:
            fresh = _count(store, run, todo, where, params) if todo else _empty()
        except duckdb.Error:
            return None
        counts = fresh if counts is None else _merge(counts, fresh)
        covered = covered | frozenset(todo)
        KEPT.put(key, (covered, counts), len(counts))
    return counts


def _count(store, run: str, files: list[str], where: str, params: list) -> pd.DataFrame:
    return store.sql(f"""
        SELECT layer, token_id AS x, expert, count(*) AS routed,
               count(*) FILTER (WHERE slot = 0) AS top1
        FROM read_parquet({sql_list(files)}, union_by_name=true) WHERE {where} AND token_id >= 0 GROUP BY ALL""",
                     params, run=run)


def _empty() -> pd.DataFrame:
    types = {"layer": np.int16, "x": np.int32, "expert": np.int16, "routed": np.int64, "top1": np.int64}
    return pd.DataFrame({c: np.zeros(0, t) for c, t in types.items()})


def _merge(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    if b.empty:
        return a
    both = pd.concat([a, b], ignore_index=True)
    return both.groupby(["layer", "x", "expert"], as_index=False, sort=False)[["routed", "top1"]].sum()


def shares(counts: pd.DataFrame, col: str, min_count: int, top: int | None) -> pd.DataFrame:
    """vocab_specialisation's window result from counts: N_x ≥ min_count, share, each expert's `top` ids."""
    tokens = counts.groupby(["layer", "x"])["top1"].transform("sum")
    v = counts.assign(tokens=tokens)[tokens >= min_count]
    v = pd.DataFrame({"layer": v["layer"], col: v["x"], "expert": v["expert"], "tokens": v["tokens"].astype("int64"),
                      "routed": v["routed"].astype("int64"), "share": v["routed"] / v["tokens"]})
    if top:
        v = v.iloc[_top_rows(v, col, top)]
    return v.sort_values(["layer", col, "expert"], kind="stable").reset_index(drop=True)


def _top_rows(v: pd.DataFrame, col: str, top: int) -> np.ndarray:
    """Positions of each (layer, expert)'s `top` rows by share, then tokens, descending, then id ascending.

    A sort of every row costs seconds at millions of (id, expert) pairs; instead each group's
    top-th share is found by partition and only rows at or above it are ordered.
    """
    group = v.groupby(["layer", "expert"], sort=False).ngroup().to_numpy()
    share, tokens, ids = v["share"].to_numpy(), v["tokens"].to_numpy(), v[col].to_numpy()
    by_group = np.argsort(group, kind="stable")
    bounds = np.flatnonzero(np.diff(group[by_group])) + 1
    picked = []
    for rows in np.split(by_group, bounds):
        if len(rows) > top:
            kth = np.partition(share[rows], len(rows) - top)[len(rows) - top]
            rows = rows[share[rows] >= kth]  # ties with the top-th share stay: the finer keys decide
        order = np.lexsort((ids[rows], -tokens[rows], -share[rows]))
        picked.append(rows[order[:top]])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)
