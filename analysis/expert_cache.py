"""Hot-set cache what-if: how much of the routing a cache of N experts per layer would have served.

Legend: E experts of a layer, N cache size (experts held), n accesses (routing rows) of
one replay stream.

- Coverage (exact, expert_step): the share of the window's (token, slot) assignments that
  the N most loaded experts of the window took: an ideal static hot set chosen in hindsight.
- LRU and LFU hit rates: the routing rows replayed in recorded token order (step,
  microbatch, seq, pos, then slot), one cache per (layer, rank) since every rank's GPU
  holds its own. Each routing row is one access; a miss loads the expert, evicting
  (LRU) the least recently used one, or (LFU) the one with the fewest uses since it
  was loaded, the least recently used of those on a tie. The cache starts empty, so
  first uses count as misses. Sampled routing rows give an estimate over the sample.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from moescope.analysis.query import Scope, check_options


def lru_hits(x_n: np.ndarray, sizes: list[int]) -> dict[int, np.ndarray]:
    """Per cache size, whether each access of x_n hits an LRU cache of that size.

    An access hits an LRU cache of N iff fewer than N distinct other experts were accessed
    since the previous access to the same expert (its stack distance, Mattson et al. 1970),
    which gives every size from one pass: for each expert e, whether e was accessed between
    an access's previous occurrence and itself.
    """
    n = len(x_n)
    idx = np.arange(n)
    order = np.lexsort((idx, x_n))
    prev_n = np.full(n, -1)
    same = x_n[order][1:] == x_n[order][:-1]
    prev_n[order[1:][same]] = order[:-1][same]
    distance_n = np.zeros(n, dtype=np.int64)
    reused = prev_n >= 0
    for e in np.unique(x_n):
        pos_e = np.flatnonzero(x_n == e)
        j = np.searchsorted(pos_e, prev_n[reused], side="right")
        nxt = np.where(j < len(pos_e), pos_e[np.minimum(j, len(pos_e) - 1)], n)
        distance_n[reused] += nxt < idx[reused]
    return {size: reused & (distance_n < size) for size in sizes}


def lfu_hits(x_n: np.ndarray, size: int) -> np.ndarray:
    """Whether each access of x_n hits an LFU cache of `size` (counts since loading, LRU on ties)."""
    hits = np.zeros(len(x_n), dtype=bool)
    uses: dict[int, int] = {}
    last: dict[int, int] = {}
    for i, e in enumerate(x_n.tolist()):
        if e in uses:
            hits[i] = True
            uses[e] += 1
        else:
            if len(uses) >= size:
                victim = min(uses, key=lambda j: (uses[j], last[j]))
                del uses[victim], last[victim]
            uses[e] = 1
        last[e] = i
    return hits


def _check_sizes(cache_sizes) -> list[int]:
    if isinstance(cache_sizes, int) and not isinstance(cache_sizes, bool):
        cache_sizes = [cache_sizes]
    if isinstance(cache_sizes, (str, bytes)) or not hasattr(cache_sizes, "__iter__"):
        raise ValueError(f"cache_sizes must be a list of positive ints, got {cache_sizes!r}")
    sizes = list(cache_sizes)
    if not sizes or not all(not isinstance(s, bool) and hasattr(s, "__index__") and int(s) >= 1 for s in sizes):
        raise ValueError(f"cache_sizes must be a list of positive ints, got {cache_sizes!r}")
    return sorted({int(s) for s in sizes})


def expert_cache(store, scope: Scope, meta: pd.DataFrame, cache_sizes=(1, 2, 4), **options) -> pd.DataFrame:
    """Hot-set cache what-if per layer and cache size N (experts held on the GPU).

    Definition: METRICS.md §20. The LRU expert cache of offloaded MoE inference (Eliseev &
    Mazur 2023, §3.1), and LFU beside it, replayed on the recorded routing.

    coverage: share of assignments taken by the N most loaded experts of the window
    (exact, expert_step; the best static hot set in hindsight). lru_hit_rate / lfu_hit_rate:
    hit rate of an LRU / LFU cache of N experts replayed over the routing rows in recorded
    token order (step, microbatch, seq, pos, slot), one cache per (layer, rank), starting
    empty; LFU counts uses since loading and evicts the least recently used on a tie.

    by="window" (default): columns layer, cache_size, num_experts, coverage, lru_hit_rate,
    lfu_hit_rate, accesses. by="step": the same per step (coverage of that step's own top-N;
    hit rates of the continuous replay's accesses at that step).
    """
    check_options("expert_cache", options, set())
    sizes = _check_sizes(cache_sizes)
    rows = meta[[scope.layers is None or int(x) in scope.layers for x in meta.layer]]
    e_by_layer = dict(zip(rows.layer.astype(int), rows.E.astype(int)))
    by_step = scope.by == "step"
    where, params = scope.where()
    loads = store.sql(f"""SELECT {scope.step_key} layer, expert, sum(tokens)::DOUBLE AS load FROM expert_step
                          WHERE {where} GROUP BY ALL""", params, run=scope.run)
    keys = ["step", "layer"] if by_step else ["layer"]
    coverage = []
    for key, grp in loads[loads.layer.isin(list(e_by_layer))].groupby(keys):
        key = key if isinstance(key, tuple) else (key,)
        top = np.sort(grp.load.to_numpy())[::-1]
        total = top.sum()
        for size in sizes:
            coverage.append((*key, size, top[:size].sum() / total if total > 0 else np.nan))
    cov = pd.DataFrame(coverage, columns=[*keys, "cache_size", "coverage"])
    hits = _replay(store, scope, sizes, list(e_by_layer), by_step)
    df = cov.merge(hits, on=[*keys, "cache_size"], how="outer")
    df["accesses"] = df.accesses.fillna(0).astype("int64")
    df.insert(len(keys) + 1, "num_experts", df.layer.map(e_by_layer).astype("int64"))
    return df[[*keys, "cache_size", "num_experts", "coverage", "lru_hit_rate", "lfu_hit_rate", "accesses"]] \
        .sort_values([*keys, "cache_size"]).reset_index(drop=True)


def _replay(store, scope: Scope, sizes: list[int], layers: list[int], by_step: bool) -> pd.DataFrame:
    where, params = dataclasses.replace(scope, layers=tuple(layers)).where()
    tab = store.sql(f"""SELECT layer, rank, step, expert FROM routing WHERE {where}
                        ORDER BY layer, rank, step, checkpoint, microbatch, seq, pos, slot""", params, run=scope.run)
    layer_n, rank_n = tab.layer.to_numpy(), tab["rank"].to_numpy()
    step_n, expert_n = tab.step.to_numpy(), tab.expert.to_numpy().astype(np.int64)
    out = []
    bounds = np.flatnonzero((np.diff(layer_n) != 0) | (np.diff(rank_n) != 0)) + 1
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(layer_n)]):
        if hi <= lo:
            continue
        x, steps = expert_n[lo:hi], step_n[lo:hi]
        lru = lru_hits(x, sizes)
        for size in sizes:
            lfu = lfu_hits(x, size)
            frame = pd.DataFrame({"step": steps, "lru": lru[size], "lfu": lfu})
            part = frame.groupby("step").agg(lru=("lru", "sum"), lfu=("lfu", "sum"), accesses=("lru", "size")).reset_index() \
                if by_step else pd.DataFrame({"lru": [lru[size].sum()], "lfu": [lfu.sum()], "accesses": [hi - lo]})
            part["layer"], part["cache_size"] = int(layer_n[lo]), size
            out.append(part)
    keys = ["step", "layer", "cache_size"] if by_step else ["layer", "cache_size"]
    if not out:
        return pd.DataFrame(columns=[*keys, "lru_hit_rate", "lfu_hit_rate", "accesses"])
    df = pd.concat(out, ignore_index=True).groupby(keys).sum().reset_index()  # ranks summed
    df["lru_hit_rate"] = df.lru / df.accesses
    df["lfu_hit_rate"] = df.lfu / df.accesses
    return df[[*keys, "lru_hit_rate", "lfu_hit_rate", "accesses"]]
