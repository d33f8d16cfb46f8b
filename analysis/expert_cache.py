"""Hot-set cache what-if: how much of the routing a cache of N experts per layer would have served.

Legend: E experts of a layer, N cache size (experts held), n accesses (routing rows) of
one replay stream.

- Coverage (exact, expert_step): the share of the window's (token, slot) assignments that
  the N most loaded experts of the window took: an ideal static hot set chosen in hindsight.
- LRU and LFU hit rates: the routing rows replayed in recorded token order (step,
  checkpoint, microbatch, seq, pos, then slot), one cache per (layer, rank) since every
  rank's GPU holds its own. Each routing row is one access; a miss loads the expert,
  evicting (LRU) the least recently used one, or (LFU) the one with the fewest uses since
  it was loaded, the least recently used of those on a tie. The cache starts empty, so
  first uses count as misses. Sampled routing rows give an estimate over the sample.

Cost. Rows are read once, unsorted, as one 64-bit token-order key per row (built by DuckDB
from the columns' ranges in the segment footers). Rows that come out of the segments in key
order already (the probe writes them so) are taken as they are, checked a chunk at a time;
others are sorted in numpy. Where every segment's footer says its rows were written in token
order (collector/token_order.py) and a rank's segments do not overlap in steps, no key is
built: the rows are read as their expert alone, in file order, and cut into streams and
steps by a GROUP BY's row counts per (layer, rank, step). LRU is exact for every cache size from
one pass of stack distances (Mattson et al. 1970), counted per (step, distance) by a C
kernel (cache_kernels; numpy without a C compiler). LFU is not a stack algorithm: each size is its own sequential
replay, exact, counted per step in C (Python without a compiler). The LRU pass and the LFU
sizes run side by side in threads. N = 1 (LFU = LRU) and N at least the stream's distinct
experts (nothing is evicted) need no replay.
"""
from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from moescope.analysis import cache_kernels, segment_footers
from moescope.analysis.memo import BoundedMemo, segments_key
from moescope.analysis.placement_replay import sum_by_value
from moescope.analysis.query import Scope, check_options
from moescope.collector.store import sql_list

# Columns of the replay order after layer and rank, most significant first (checkpoint is coded separately).
_ORDER = ("step", "checkpoint", "microbatch", "seq", "pos", "slot")


def lru_hits(x_n: np.ndarray, sizes: list[int]) -> dict[int, np.ndarray]:
    """Per cache size, whether each access of x_n hits an LRU cache of that size.

    An access hits an LRU cache of N iff fewer than N distinct other experts were accessed
    since the previous access to the same expert: its stack distance (Mattson et al. 1970),
    so one pass of stack_distances gives every size.
    """
    distance_n = stack_distances(x_n)
    return {size: (distance_n >= 0) & (distance_n < size) for size in sizes}


def stack_distances(x_n: np.ndarray) -> np.ndarray:
    """Each access's LRU stack distance, −1 on an expert's first access: a move-to-front list in C (cache_kernels),
    else numpy, per expert e, whether e's latest access before this one came after the previous access to this one's."""
    x_n = np.asarray(x_n)
    if not len(x_n):
        return np.zeros(0, dtype=np.int32)
    ids, num_ids = _dense_ids(x_n)
    distance_n = cache_kernels.lru_distances(ids, num_ids)
    return _stack_distances(x_n) if distance_n is None else distance_n


def _stack_distances(x_n: np.ndarray) -> np.ndarray:
    """LRU stack distances in O(E·n) numpy."""
    n = len(x_n)
    idx = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
    order = np.argsort(x_n, kind="stable")
    sorted_x = x_n[order]
    same = sorted_x[1:] == sorted_x[:-1]
    prev_n = np.full(n, -1, dtype=idx.dtype)
    prev_n[order[1:][same]] = order[:-1][same]
    distance_n = np.zeros(n, dtype=np.int32)
    after = prev_n[1:]
    for e in sorted_x[np.r_[0, np.flatnonzero(~same) + 1]].tolist():
        last = np.where(x_n == e, idx, -1)
        np.maximum.accumulate(last, out=last)  # last[i]: e's latest access at or before i
        distance_n[1:] += last[:-1] > after
    distance_n[prev_n < 0] = -1
    return distance_n


def _dense_ids(x_n: np.ndarray) -> tuple[np.ndarray, int]:
    """(ids 0..num_ids-1 of the accesses, num_ids): expert ids as they are when small."""
    lo, hi = int(x_n.min()), int(x_n.max())
    if hi - lo < 1 << 20:
        return (x_n - lo if lo else x_n), hi - lo + 1
    uniq, ids = np.unique(x_n, return_inverse=True)
    return ids, len(uniq)


def lfu_hits(x_n, size: int, distances: np.ndarray | None = None) -> np.ndarray:
    """Whether each access of x_n hits an LFU cache of `size` (uses since loading, LRU on ties).

    Replayed by the C kernel of cache_kernels (Python without a compiler), except where the
    stack distances (pass them when known) answer it: size 1 is LRU of 1, and a size holding
    every expert of the stream never evicts, so every reuse hits.
    """
    x_n = np.asarray(x_n)
    if not len(x_n):
        return np.zeros(0, dtype=bool)
    distance_n = stack_distances(x_n) if distances is None else distances
    if size == 1:
        return distance_n == 0
    if size >= np.count_nonzero(distance_n < 0):  # the stream's distinct experts
        return distance_n >= 0
    return _lfu_replay(x_n, size)


def _lfu_replay(x_n: np.ndarray, size: int) -> np.ndarray:
    ids, num_ids = _dense_ids(x_n)
    return cache_kernels.lfu_replay(ids, num_ids, size)


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
    token order (step, checkpoint, microbatch, seq, pos, slot), one cache per (layer, rank),
    starting empty; LFU counts uses since loading and evicts the least recently used on a tie.
    Both are exact.

    by="window" (default): columns layer, cache_size, num_experts, coverage, lru_hit_rate,
    lfu_hit_rate, accesses. by="step": the same per step (coverage of that step's own top-N;
    hit rates of the continuous replay's accesses at that step).
    """
    check_options("expert_cache", options, set())
    sizes = _check_sizes(cache_sizes)
    rows = meta[[scope.layers is None or int(x) in scope.layers for x in meta.layer]]
    e_by_layer = dict(zip(rows.layer.astype(int), rows.E.astype(int)))
    by_step = scope.by == "step"
    keys = ["step", "layer"] if by_step else ["layer"]
    cov = _coverage(store, scope, sizes, e_by_layer, keys)
    hits = _replay(store, scope, sizes, sorted(e_by_layer), by_step)
    df = cov.merge(hits, on=[*keys, "cache_size"], how="outer")
    df["accesses"] = df.accesses.fillna(0).astype("int64")
    df.insert(len(keys) + 1, "num_experts", df.layer.map(e_by_layer).astype("int64"))
    df = df[[*keys, "cache_size", "num_experts", "coverage", "lru_hit_rate", "lfu_hit_rate", "accesses"]] \
        .sort_values([*keys, "cache_size"]).reset_index(drop=True)
    return df


def _coverage(store, scope: Scope, sizes: list[int], e_by_layer: dict[int, int], keys: list[str]) -> pd.DataFrame:
    """Top-N share of each (step,) layer's assignments, from expert_step."""
    where, params = scope.where()
    loads = store.sql(f"""SELECT {scope.step_key} layer, expert, sum(tokens)::DOUBLE AS load FROM expert_step
                          WHERE {where} GROUP BY ALL""", params, run=scope.run)
    loads = loads[loads.layer.isin(list(e_by_layer))]
    if loads.empty:
        return pd.DataFrame(columns=[*keys, "cache_size", "coverage"])
    groups = loads.groupby(keys, sort=True).ngroup().to_numpy()
    n_groups = int(groups.max()) + 1
    # each group's loads, largest first, padded with zeros to the widest group
    rank = loads.assign(g=groups).groupby("g").load.rank(method="first", ascending=False).to_numpy().astype(np.int64) - 1
    table = np.zeros((n_groups, int(rank.max()) + 1))
    table[groups, rank] = loads.load.to_numpy()
    cum = np.cumsum(table, axis=1)
    total = cum[:, -1]
    first = loads.assign(g=groups).drop_duplicates("g").sort_values("g")[keys]
    out = []
    for size in sizes:
        with np.errstate(divide="ignore", invalid="ignore"):
            share = np.where(total > 0, cum[:, min(size, cum.shape[1]) - 1] / total, np.nan)
        out.append(first.assign(cache_size=size, coverage=share))
    return pd.concat(out, ignore_index=True)


def _replay(store, scope: Scope, sizes: list[int], layers: list[int], by_step: bool) -> pd.DataFrame:
    keys = ["step", "layer", "cache_size"] if by_step else ["layer", "cache_size"]
    streams = _streams(store, scope, layers)
    _compute(streams, sizes)
    out = []
    for s in streams:
        for size in sizes:
            lru, lfu = s.lru(size), s.lfu(size)
            part = pd.DataFrame({"lru": lru, "lfu": lfu, "accesses": s.step_n} if by_step else
                                {"lru": [lru.sum()], "lfu": [lfu.sum()], "accesses": [s.step_n.sum()]})
            if by_step:
                part.insert(0, "step", s.step_u)
            part["layer"], part["cache_size"] = s.layer, size
            out.append(part)
    if not out:
        return pd.DataFrame(columns=[*keys, "lru_hit_rate", "lfu_hit_rate", "accesses"])
    df = pd.concat(out, ignore_index=True).groupby(keys).sum().reset_index()  # ranks summed
    df["lru_hit_rate"] = df.lru / df.accesses
    df["lfu_hit_rate"] = df.lfu / df.accesses
    return df[[*keys, "lru_hit_rate", "lfu_hit_rate", "accesses"]]


def _compute(streams: list[Stream], sizes: list[int]) -> None:
    """Run the replays the sizes need and the streams lack, side by side: each is one sequential pass, and the C
    kernels release the GIL, so on C cores C of them run at once."""
    jobs = [job for s in streams for job in s.missing(sizes)]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(len(jobs), cores)
    if workers < 2:
        for job in jobs:
            job()
        return
    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(lambda job: job(), jobs):
            pass


class Stream:
    """One (layer, rank) cache's accesses in token order, with its hits per step as they are asked for.

    LRU: the accesses of each step by stack distance (the last column: first accesses),
    summed along, so any cache size is a column. LFU: replayed once per cache size asked.
    """

    def __init__(self, layer: int, rank: int, step_u: np.ndarray, step_n: np.ndarray, experts: np.ndarray):
        self.layer, self.rank, self.step_u, self.step_n = layer, rank, step_u, step_n
        ids, self.num_ids = _dense_ids(np.asarray(experts))
        self.ids = ids.astype(np.int16 if self.num_ids <= 1 << 15 else np.int32, copy=False)
        self._lru_cum: np.ndarray | None = None
        self._lfu: dict[int, np.ndarray] = {}

    @property
    def distinct(self) -> int:
        """The experts the stream uses: its first accesses, the LRU counts' last column."""
        if self._lru_cum is None:
            self._count_lru()
        return int(self._lru_cum[:, -1].sum() - self._lru_cum[:, -2].sum()) if self.num_ids else 0

    def missing(self, sizes: list[int]) -> list:
        """The replays (callables) that answering these sizes needs and this stream has not run yet. Before the
        LRU pass, which counts the experts used, every expert counts: a size the stream turns out to fill whole
        is replayed for nothing, and gives the same hits. Longest first (larger LFU caches, then the LRU pass, the
        fastest), so threads finish together."""
        used = self.num_ids if self._lru_cum is None else self.distinct
        lfu = [lambda size=size: self._replay_lfu(size) for size in sorted(set(sizes), reverse=True)
               if 1 < size < used and size not in self._lfu]
        return lfu + ([self._count_lru] if self._lru_cum is None else [])

    def lru(self, size: int) -> np.ndarray:
        """LRU hits per step of a cache of `size`."""
        if not self.distinct:
            return np.zeros(len(self.step_u), np.int64)
        if self._lru_cum is None:
            self._count_lru()
        return self._lru_cum[:, min(size, self.distinct) - 1]

    def lfu(self, size: int) -> np.ndarray:
        """LFU hits per step of a cache of `size`: LRU where they agree (one expert; every expert held), else replayed."""
        if size == 1 or size >= self.distinct:
            return self.lru(size)
        if size not in self._lfu:
            self._replay_lfu(size)
        return self._lfu[size]

    def _count_lru(self) -> None:
        hist = cache_kernels.lru_step_hist(self.ids, self.num_ids, self.step_n) if len(self.ids) else None
        if hist is None:  # no C kernel: stack distances in numpy, counted per (step, distance)
            d = stack_distances(self.ids)
            width = self.num_ids + 1
            cell = np.repeat(np.arange(len(self.step_u), dtype=np.int64) * width, self.step_n)
            cell += np.where(d < 0, width - 1, d)
            hist = np.bincount(cell, minlength=len(self.step_u) * width).reshape(-1, width)
        self._lru_cum = hist.cumsum(1)

    def _replay_lfu(self, size: int) -> None:
        self._lfu[size] = cache_kernels.lfu_step_hits(self.ids, self.num_ids, size, self.step_n)

    @property
    def nbytes(self) -> int:
        """What the stream holds once its LRU counts are made (the LFU hits per step are small beside them)."""
        return self.ids.nbytes + len(self.step_u) * (self.num_ids + 1) * 8 + self.step_u.nbytes + self.step_n.nbytes


# Streams read before, per (store, run, live routing segments, scope); bounded in bytes.
STREAMS = BoundedMemo(1 << 28)


def _streams(store, scope: Scope, layers: list[int]) -> list[Stream]:
    """Every (layer, rank) stream of the scope, in token order (the same segments and scope: read once)."""
    key = (*segments_key(store, "routing", scope.run), tuple(layers), scope.steps, scope.checkpoint, scope.phase,
           scope.ranks)
    found = STREAMS.get(key)
    if found is None:
        found = [Stream(*parts) for parts in _read_streams(store, scope, layers)]
        STREAMS.put(key, found, sum(s.nbytes for s in found))
    return found


def _read_streams(store, scope: Scope, layers: list[int]):
    """(layer, rank, steps, accesses per step, expert of each access) per replay stream, in token order."""
    where, params = dataclasses.replace(scope, layers=tuple(layers)).where()
    plan = _OrderKey.plan(store, scope, layers, where, params)
    if plan is None:  # ranges unknown, or too wide for one 64-bit key: DuckDB sorts
        tab = store.arrow(f"""SELECT layer, rank, step, expert FROM routing WHERE {where}
                              ORDER BY layer, rank, {", ".join(_ORDER)}""", params, run=scope.run)
        layer_n, rank_n = tab.column("layer").to_numpy(), tab.column("rank").to_numpy()
        step_n, expert_n = tab.column("step").to_numpy(), tab.column("expert").to_numpy()
        bounds = np.flatnonzero((np.diff(layer_n) != 0) | (np.diff(rank_n) != 0)) + 1
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(layer_n)]):
            if hi > lo:
                yield (int(layer_n[lo]), int(rank_n[lo]), *_runs(step_n[lo:hi]), expert_n[lo:hi])
        return
    if plan.presorted:
        yield from _read_presorted(store, scope, plan, where, params)
        return
    con = store.connect(scope.run, tables=())
    try:
        tab = con.sql(f"SELECT {plan.sql} AS key, expert FROM read_parquet({sql_list(plan.files)}, union_by_name=true) "
                      f"WHERE {where}", params=params or None).to_arrow_table()
    finally:
        con.close()
    if not tab.num_rows:
        return
    chunks = _ordered_chunks(tab.column("key"))
    if chunks is not None:  # the usual case: every segment's rows in token order, segments read in order
        expert = tab.column("expert").to_numpy()
        runs = [_runs(c >> plan.step_shift) for c in chunks]
        code, count = sum_by_value(np.concatenate([r[0] for r in runs]), np.concatenate([r[1] for r in runs]))
    else:
        key, expert = _in_key_order(tab.column("key").to_numpy(), tab.column("expert").to_numpy())
        code, count = _runs(key >> plan.step_shift)  # the key's bits from the step up: one per (stream, step)
    stream = code >> (plan.stream_shift - plan.step_shift) if len(layers) > 1 or plan.rank_bits \
        else np.zeros(len(code), dtype=np.int64)
    ends = np.cumsum(count)
    stream_ends = np.cumsum(_runs(stream)[1])  # the (step) runs of each (layer, rank) stream
    for lo, hi in zip(np.r_[0, stream_ends[:-1]], stream_ends):
        layer, rank = plan.stream(int(stream[lo]))
        yield layer, rank, plan.steps(code[lo:hi] << plan.step_shift), count[lo:hi], \
            expert[ends[lo] - count[lo]:ends[hi - 1]]


def _read_presorted(store, scope: Scope, plan: _OrderKey, where: str, params: list):
    """The streams of segments whose rows come out in token order (_presorted): only the expert of each row, in the
    order read, and each (layer, rank, step)'s row count from a GROUP BY. Within a layer the rows are in (rank, step)
    order, so the counts cut them into streams and steps; no per-row key is built (a 64-bit key per row cost as
    much as the scan)."""
    source = f"read_parquet({sql_list(plan.files)}, union_by_name=true) WHERE {where}"
    several = len(plan.layers) > 1
    # Grouped by what varies: a constant layer or rank costs the GROUP BY a third more and says nothing.
    keys = ["layer"] * several + ["rank"] * bool(plan.rank_bits) + ["step"]
    con = store.connect(scope.run, tables=())
    try:
        counts = con.sql(f"SELECT {', '.join(keys)}, count(*) AS n FROM {source} GROUP BY ALL ORDER BY ALL",
                         params=params or None).fetchnumpy()
        tab = con.sql(f"SELECT {'layer, ' if several else ''}expert FROM {source}", params=params or None).to_arrow_table()
    finally:
        con.close()
    expert = tab.column("expert").to_numpy()
    if several:  # a layer's rows keep their order; layers interleave within a segment
        expert = expert[np.argsort(tab.column("layer").to_numpy(), kind="stable")]
    step_n, count_n = np.asarray(counts["step"]), np.asarray(counts["n"])
    if not len(step_n):  # no row matches the scope
        return
    layer_n = np.asarray(counts["layer"]) if several else np.full(len(step_n), plan.layers[0])
    rank_n = np.asarray(counts["rank"]) if plan.rank_bits else np.full(len(step_n), plan.rank_lo)
    if int(count_n.sum()) != len(expert):
        raise RuntimeError(f"routing rows changed while read: {len(expert)} rows, counted {int(count_n.sum())}")
    ends = np.cumsum(count_n)
    stream_ends = np.r_[np.flatnonzero((np.diff(layer_n) != 0) | (np.diff(rank_n) != 0)) + 1, len(layer_n)]
    lo = 0
    for hi in stream_ends:
        start = int(ends[lo - 1]) if lo else 0
        yield int(layer_n[lo]), int(rank_n[lo]), step_n[lo:hi], count_n[lo:hi].astype(np.int64), \
            expert[start:int(ends[hi - 1])]
        lo = hi


def _ordered_chunks(key) -> list[np.ndarray] | None:
    """The key column's chunks as arrays (no copy) when the rows are already in key order, else None: checked a
    chunk at a time, so the whole column is never gathered into one array."""
    chunks, last = [], None
    for chunk in key.chunks:
        c = chunk.to_numpy()
        if not len(c):
            continue
        if (last is not None and c[0] < last) or (c[1:] < c[:-1]).any():
            return None
        chunks.append(c)
        last = c[-1]
    return chunks


def _runs(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The values of a sorted array and how many times each appears."""
    starts = np.r_[0, np.flatnonzero(v[1:] != v[:-1]) + 1]
    return v[starts], np.diff(np.r_[starts, len(v)])


def _in_key_order(key: np.ndarray, expert: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by key. Each segment's rows are usually a sorted run already: runs that do not interleave are
    put in order whole, others are sorted."""
    down = np.flatnonzero(key[1:] < key[:-1]) + 1
    if not len(down):
        return key, expert
    if len(down) < 4096:
        starts, ends = np.r_[0, down], np.r_[down, len(key)]
        order = np.argsort(key[starts], kind="stable")
        if np.all(key[ends - 1][order][:-1] <= key[starts][order][1:]):
            pieces = [slice(int(starts[i]), int(ends[i])) for i in order]
            return np.concatenate([key[p] for p in pieces]), np.concatenate([expert[p] for p in pieces])
    order = np.argsort(key, kind="stable")
    return key[order], expert[order]


@dataclasses.dataclass
class _OrderKey:
    """One int64 per routing row that sorts as (layer, rank, step, checkpoint, microbatch, seq, pos, slot).

    Each column takes the bits of its range (segment footer statistics; layers by index,
    checkpoints by their sorted names): DuckDB computes it in parallel while scanning, and
    one numpy sort of one column replaces an eight-key ORDER BY.
    """

    sql: str
    layers: list[int]
    rank_lo: int
    rank_bits: int
    step_lo: int
    step_shift: int
    step_bits: int
    stream_shift: int
    files: list[str]  # the routing segments, in the order to read them
    presorted: bool = False  # rows come out of the files in token order within each layer (_presorted)

    def stream(self, code: int) -> tuple[int, int]:
        return self.layers[code >> self.rank_bits], (code & ((1 << self.rank_bits) - 1)) + self.rank_lo

    def steps(self, key: np.ndarray) -> np.ndarray:
        return ((key >> self.step_shift) & ((1 << self.step_bits) - 1)) + self.step_lo

    @staticmethod
    def plan(store, scope: Scope, layers: list[int], where: str, params: list) -> _OrderKey | None:
        files = store.segment_paths("routing", scope.run)
        if not files or not layers:
            return None
        found = segment_footers.footers(store, scope.run, files)
        if not all(found[f].full() for f in files):
            return None
        per_file = {f: found[f].ranges for f in files}
        flagged = {f for f in files if found[f].token_order}
        ranges = {col: (min(f[col][0] for f in per_file.values()), max(f[col][1] for f in per_file.values()))
                  for col in next(iter(per_file.values()))}
        if scope.steps is not None:  # the window narrows the step range
            ranges["step"] = (max(ranges["step"][0], scope.steps[0]), min(ranges["step"][1], scope.steps[1]))
            if ranges["step"][0] > ranges["step"][1]:
                ranges["step"] = (scope.steps[0], scope.steps[0])
        layer_index = "CASE layer " + " ".join(f"WHEN {int(x)} THEN {i}" for i, x in enumerate(layers)) + " END"
        rank_bits = (ranges["rank"][1] - ranges["rank"][0]).bit_length()
        layer_bits = (len(layers) - 1).bit_length()
        step_bits = (int(ranges["step"][1]) - int(ranges["step"][0])).bit_length()
        # Read in order of (rank, step) ranges: each segment's rows are usually in token order, so rows come out sorted.
        in_order = sorted(files, key=lambda f: (per_file[f]["rank"], per_file[f]["step"], f))
        if _presorted(in_order, per_file, flagged) and step_bits + rank_bits + layer_bits <= 62:
            # Rows come out in token order: (stream, step) is key enough, and only layer, rank and step are read.
            coarse = [f"(step - {int(ranges['step'][0])})::BIGINT"]
            if rank_bits:
                coarse.append(f"((rank - {int(ranges['rank'][0])})::BIGINT << {step_bits})")
            if layer_bits:
                coarse.append(f"({layer_index}::BIGINT << {step_bits + rank_bits})")
            return _OrderKey(" | ".join(coarse), list(layers), int(ranges["rank"][0]), rank_bits,
                             int(ranges["step"][0]), 0, step_bits, step_bits, in_order, presorted=True)
        checkpoints = [] if scope.checkpoint is not None else sorted(store.sql(
            f"SELECT DISTINCT checkpoint FROM expert_step WHERE {where}", params, run=scope.run).checkpoint.dropna())
        parts = []  # (sql value from 0, bits), least significant first
        for col in reversed(_ORDER):
            if col == "checkpoint":
                if len(checkpoints) > 1:  # a checkpoint expert_step lacks sorts after the known ones
                    case = " ".join(f"WHEN '{c.replace(chr(39), chr(39) * 2)}' THEN {i}" for i, c in enumerate(checkpoints))
                    parts.append((f"(CASE checkpoint {case} ELSE {len(checkpoints)} END)", len(checkpoints).bit_length()))
                continue
            lo, hi = ranges[col]
            parts.append((f"({col} - {int(lo)})", (int(hi) - int(lo)).bit_length()))
        below = sum(b for _, b in parts)
        if below + rank_bits + layer_bits > 62:
            return None
        terms, shift, step_shift = [], 0, 0
        for value, bits in parts:
            if value.startswith("(step"):
                step_shift = shift
            if bits:
                terms.append(f"({value}::BIGINT << {shift})" if shift else f"{value}::BIGINT")
            shift += bits
        if rank_bits:
            terms.append(f"((rank - {int(ranges['rank'][0])})::BIGINT << {shift})")
        if layer_bits:
            terms.append(f"({layer_index}::BIGINT << {shift + rank_bits})")
        return _OrderKey(" | ".join(terms) or "0::BIGINT", list(layers), int(ranges["rank"][0]), rank_bits,
                         int(ranges["step"][0]), step_shift, step_bits, shift, in_order)


def _presorted(in_order: list[str], per_file: dict, flagged: set[str]) -> bool:
    """Whether the segments, read in this order, give every (layer, rank) stream's rows in token order: each was
    written in token order with one rank and one checkpoint (collector/token_order.py), and a rank's segments cover
    disjoint step ranges, ascending."""
    last_step: dict[int, int] = {}
    for f in in_order:
        (rank, rank_hi), (lo, hi) = per_file[f]["rank"], per_file[f]["step"]
        if f not in flagged or rank != rank_hi or lo <= last_step.get(rank, lo - 1):
            return False
        last_step[rank] = hi
    return True


