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
from moescope.analysis.placement_replay import stream_sql
from moescope.collector.store import sql_list

# (store, run, row filter) -> (segments counted, counts); bounded in counted (layer, id, expert) rows.
KEPT = BoundedMemo(1 << 24)


def whole_run_counts(store, run: str, where: str, params: list) -> pd.DataFrame | None:
    """Columns layer, x (token id ≥ 0), expert, routed (rows), top1 (slot-0 rows) over the rows matching `where`.

    `where` must not filter steps (counts are per whole segment). None when a segment
    cannot be read directly; the caller then counts through the store's views.
    """
    kept = _kept(store, run, where, params)
    return None if kept is None else kept[1]


def whole_run_shares(store, run: str, where: str, params: list, min_count: int, top: int | None) -> pd.DataFrame | None:
    """shares() of whole_run_counts, kept with the counts: a refresh of the page with no new segment computes
    nothing. A copy, so a caller's changes stay its own."""
    kept = _kept(store, run, where, params)
    if kept is None:
        return None
    answers = kept[2]
    if (min_count, top) not in answers:
        if len(answers) >= KEPT_ANSWERS:
            answers.pop(next(iter(answers)))
        answers[min_count, top] = shares(kept[1], "token_id", min_count, top)
    return answers[min_count, top].copy()


# Answers kept per counts: a few (min_count, top) views of one run.
KEPT_ANSWERS = 4


def _kept(store, run: str, where: str, params: list) -> tuple[frozenset, pd.DataFrame, dict] | None:
    """(segments counted, counts, shares answered from them), read through what is kept."""
    files = store.segment_paths("routing", run)
    key = (str(store.root), run, where, tuple(params))
    kept, live = KEPT.get(key), set(files)
    if kept is not None and kept[0] == live:
        return kept
    covered, counts = (kept[0], kept[1]) if kept is not None and kept[0] <= live else (frozenset(), None)
    todo = [f for f in files if f not in covered]
    try:
        fresh = _count(store, run, todo, where, params) if todo else _empty()
    except duckdb.Error:
        return None
    counts = fresh if counts is None else _merge(counts, fresh)
    kept = (covered | frozenset(todo), counts, {})
    KEPT.put(key, kept, len(counts))
    return kept


def _count(store, run: str, files: list[str], where: str, params: list) -> pd.DataFrame:
    query = f"FROM read_parquet({sql_list(files)}, union_by_name=true) WHERE {where} AND token_id >= 0"
    counted = _DenseCounts.fold(stream_sql(store, run, f"SELECT layer, token_id, expert, slot {query}", params,
                                           tables=()))
    if counted is not None:
        return counted
    return store.sql(f"""SELECT layer, token_id AS x, expert, count(*) AS routed,
                                count(*) FILTER (WHERE slot = 0) AS top1 {query} GROUP BY ALL""", params, run=run)


class _DenseCounts:
    """(id, expert) counts of each layer in dense arrays, folded batch by batch as the scan makes them.

    DuckDB's GROUP BY of ~256k (id, expert) groups over 25M rows takes ~1.3 s on 2 cores;
    reading the same rows and counting them with bincount while the scan runs (placement_replay.stream_sql)
    takes about half that. A layer whose id × expert space outgrows DENSE_CELLS is counted by DuckDB
    instead (fold returns None).
    """

    DENSE_CELLS = 1 << 21

    def __init__(self):
        self.routed: dict[int, np.ndarray] = {}  # layer -> [ids, experts] counts
        self.top1: dict[int, np.ndarray] = {}

    @classmethod
    def fold(cls, batches) -> pd.DataFrame | None:
        """The counts of batches (dicts of layer, token_id, expert, slot arrays), or None past DENSE_CELLS."""
        counts = cls()
        for c in batches:
            if not counts.add(c["layer"], c["token_id"], c["expert"], c["slot"]):
                batches.close()  # stops the scan
                return None
        return counts.frame()

    def add(self, layer_n, x_n, expert_n, slot_n) -> bool:
        if not len(layer_n):
            return True
        if int(expert_n.min()) < 0:
            return False
        layers = [int(layer_n[0])] if layer_n[0] == layer_n[-1] and (layer_n == layer_n[0]).all() else \
            np.unique(layer_n).tolist()
        for layer in layers:
            rows = slice(None) if len(layers) == 1 else layer_n == layer
            x, e, top = x_n[rows], expert_n[rows], slot_n[rows] == 0
            routed = self._fit(layer, int(x.max()) + 1, int(e.max()) + 1)
            if routed is None:
                return False
            width = routed.shape[1]
            key = x.astype(np.int64) * width + e
            _count_into(routed, key)
            _count_into(self.top1[layer], key[top])
        return True

    def _fit(self, layer: int, ids: int, experts: int) -> np.ndarray | None:
        """The layer's counts, grown (doubling in ids) to hold ids × experts; None past DENSE_CELLS."""
        have = self.routed.get(layer)
        rows, cols = (0, 0) if have is None else have.shape
        if ids <= rows and experts <= cols:
            return have
        rows, cols = max(rows, ids, min(2 * rows, ids * 2)), max(cols, experts)
        if rows * cols > self.DENSE_CELLS:
            rows = max(ids, have.shape[0] if have is not None else 0)
            if rows * cols > self.DENSE_CELLS:
                return None
        for kept in (self.routed, self.top1):
            grown = np.zeros((rows, cols), dtype=np.int64)
            if have is not None:
                old = kept[layer]
                grown[:old.shape[0], :old.shape[1]] = old
            kept[layer] = grown
        return self.routed[layer]

    def frame(self) -> pd.DataFrame:
        parts = []
        for layer, routed in sorted(self.routed.items()):
            cells = np.flatnonzero(routed)  # row-major: (x, expert) ascending
            x, e = np.divmod(cells, routed.shape[1])
            parts.append(pd.DataFrame({"layer": np.full(len(x), layer, np.int16), "x": x.astype(np.int32),
                                       "expert": e.astype(np.int16), "routed": routed.reshape(-1)[cells],
                                       "top1": self.top1[layer].reshape(-1)[cells]}))
        return pd.concat(parts, ignore_index=True) if parts else _empty()


def _count_into(counts: np.ndarray, key: np.ndarray) -> None:
    """counts.flat[k] += how often k occurs in key. bincount makes an array of every cell: for a batch with far fewer
    rows than cells (a wide vocabulary, one layer's rows of a segment) sorting the batch's keys costs less."""
    if len(key) * 16 < counts.size:
        cells, n = np.unique(key, return_counts=True)
        counts.reshape(-1)[cells] += n
    else:
        counts += np.bincount(key, minlength=counts.size).reshape(counts.shape)


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
    tokens = _per_id_sum(counts)
    keep = tokens >= min_count
    routed = counts["routed"].to_numpy()[keep].astype(np.int64)
    tokens = tokens[keep].astype(np.int64)
    v = pd.DataFrame({"layer": counts["layer"].to_numpy()[keep], col: counts["x"].to_numpy()[keep],
                      "expert": counts["expert"].to_numpy()[keep], "tokens": tokens, "routed": routed,
                      "share": routed / tokens})
    if top:
        v = v.iloc[_top_rows(v, col, top)]
    return v.sort_values(["layer", col, "expert"], kind="stable").reset_index(drop=True)


def _per_id_sum(counts: pd.DataFrame) -> np.ndarray:
    """Each row's (layer, x) total of top1: the id's tokens N_x. Counts made from the dense arrays come sorted
    by (layer, x), so their runs are summed in one pass; others are grouped."""
    layer, x = counts["layer"].to_numpy(), counts["x"].to_numpy()
    if len(x) > 1:
        new = (layer[1:] != layer[:-1]) | (x[1:] != x[:-1])
        ahead = (layer[1:] > layer[:-1]) | ((layer[1:] == layer[:-1]) & (x[1:] > x[:-1]))
        if (ahead | ~new).all():
            starts = np.r_[0, np.flatnonzero(new) + 1]
            return np.repeat(np.add.reduceat(counts["top1"].to_numpy(), starts), np.diff(np.r_[starts, len(x)]))
    return counts.groupby(["layer", "x"])["top1"].transform("sum").to_numpy()


def _top_rows(v: pd.DataFrame, col: str, top: int) -> np.ndarray:
    """Positions of each (layer, expert)'s `top` rows by share, then tokens, descending, then id ascending.

    A sort of every row costs seconds at millions of (id, expert) pairs; instead each group's
    top-th share is found by partition and only rows at or above it are ordered.
    """
    if v.empty:
        return np.zeros(0, np.int64)
    layer, expert = v["layer"].to_numpy().astype(np.int64), v["expert"].to_numpy().astype(np.int64)
    layer -= layer.min()
    expert -= expert.min()
    group = layer * (int(expert.max()) + 1) + expert
    if group.max() < 1 << 15:
        group = group.astype(np.int16)  # numpy's stable sort of 16-bit ints is a radix sort
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
