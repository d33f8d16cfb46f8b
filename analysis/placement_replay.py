"""Routing rows replayed for the placement what-if: all-to-all copies and co-activation.

Legend: G devices, L layers of the window, E experts (the largest layer), K top-k, n rows
of a batch, S = E^K signatures (a token's chosen experts in slot order), f[l, e, d] the
share of expert e's tokens that device d computes under a placement.

What a placement costs in copies depends on each token only through (step, layer, home
device, signature), so the rows are counted that way once (histogram) and every placement
is priced from the counts (SignatureReplay: a gather through per-placement tables, or
tensor contractions over a dense count array). The probe writes a token's K rows
consecutively, so a token is its run of rows and no per-token GROUP BY is needed (the
expensive part of doing this in SQL): DuckDB turns each row into a key (step, layer, home)
and the expert, in parallel, and numpy checks the layout and counts, while a background
thread scans the next batch. Counts are kept per run (CACHE) while the segments they came
from are live, so other placements, windows and views read no rows again, and a growing
run reads only its new segments. Tokens with varying K replay row by row (Replay); rows
written in another order are replayed sorted by token.
"""
from __future__ import annotations

import dataclasses
import itertools
import queue
import threading

import numpy as np

from moescope.analysis import segment_footers
from moescope.analysis.memo import BoundedMemo
from moescope.collector.store import sql_list

# Routing rows are streamed in batches of this many rows, so memory stays flat at any run size.
BATCH_ROWS = 1 << 21


class NotAdjacent(Exception):
    """Routing rows of one token are not consecutive in slot order: replay them sorted instead."""


@dataclasses.dataclass
class Traffic:
    """Dispatch copies per (step, layer, device) of one placement, flattened."""

    sent: np.ndarray
    recv: np.ndarray
    sent_internode: np.ndarray


@dataclasses.dataclass(frozen=True)
class Grid:
    """The window's (step, layer, device) grid and how SQL maps a row onto it."""

    steps: np.ndarray
    layers: np.ndarray
    ep_size: int
    gpus_per_node: int
    e_max: int

    @property
    def size(self) -> int:
        return len(self.steps) * len(self.layers) * self.ep_size

    @property
    def stride(self) -> int:
        return int(np.gcd.reduce(np.diff(self.steps))) if len(self.steps) > 1 else 1

    def step_lut(self) -> np.ndarray | None:
        """Step offset (step − first) / stride -> step index, −1 for a step the window lacks; None when too sparse."""
        offsets = (self.steps - self.steps[0]) // self.stride
        if offsets[-1] + 1 > max(8 * len(self.steps), 1 << 20):
            return None
        lut = np.full(int(offsets[-1]) + 1, -1, dtype=np.int64)
        lut[offsets] = np.arange(len(self.steps))
        return lut

    def step_filter(self) -> str:
        lo, stride = int(self.steps[0]), self.stride
        between = f"step BETWEEN {lo} AND {int(self.steps[-1])}"
        return between if stride == 1 else f"{between} AND (step - {lo}) % {stride} = 0"

    def _offset_sql(self) -> str:
        lo, stride = int(self.steps[0]), self.stride
        return f"(step - {lo})" if stride == 1 else f"((step - {lo}) // {stride})"

    def select_sql(self) -> str:
        """Row path columns: step offset, layer·G + home, home, expert code l·E + e, slot."""
        g, li = self.ep_size, layer_index_sql(self.layers)
        return (f"{self._offset_sql()}::BIGINT AS s, ({li} * {g} + pos % {g})::INTEGER AS lh, "
                f"(pos % {g})::INTEGER AS home, ({li} * {self.e_max} + least(expert, {self.e_max - 1}))::INTEGER AS code, "
                f"slot::INTEGER AS slot")


class Replay:
    """Accumulates the copies of several placements (f tables [L·E, G]) and co-activation counts over row batches."""

    def __init__(self, grid: Grid, tables: dict[str, np.ndarray], k_max: int, coactivation: bool):
        self.grid, self.k = grid, max(1, k_max)
        self.lut = grid.step_lut()
        n_groups = len(grid.steps) * len(grid.layers)
        self.seen = np.zeros(n_groups)
        self.coact = np.zeros(len(grid.layers) * grid.e_max * grid.e_max) if coactivation else None
        self.f = {p: t.reshape(-1, grid.ep_size) for p, t in tables.items()}
        single = {p: bool(np.all((f == 0) | (f == 1))) for p, f in self.f.items()}
        # Each expert on one device: a device (and node) lookup per expert code.
        self.dev = {p: f.argmax(1).astype(np.int64) for p, f in self.f.items() if single[p]}
        nodes = grid.ep_size // grid.gpus_per_node
        self.miss = {p: 1.0 - np.concatenate([f, f.reshape(len(f), nodes, grid.gpus_per_node).sum(2)], axis=1)
                     for p, f in self.f.items() if not single[p]}
        self.traffic = {p: Traffic(np.zeros(grid.size), np.zeros(grid.size), np.zeros(grid.size)) for p in tables}
        self.tail: dict[str, np.ndarray] | None = None  # the previous batch's last K − 1 rows
        self.pending: dict[str, tuple] = {}  # replicated placements: the product of a token cut by the batch end

    def add(self, c: dict[str, np.ndarray]) -> None:
        g = self.grid
        n = len(c["slot"])
        if n == 0:
            return
        sidx = self.lut[c["s"]] if self.lut is not None else _search((g.steps - g.steps[0]) // g.stride, c["s"])
        gh = sidx * (len(g.layers) * g.ep_size) + c["lh"]
        missing = sidx < 0
        if missing.any():  # a routing row of a step expert_step never recorded: kept for adjacency, not counted
            gh[missing] = -1
        slot, home, code = c["slot"], c["home"], c["code"]
        t = 0 if self.tail is None else len(self.tail["slot"])
        slot_x = np.concatenate([self.tail["slot"], slot]) if t else slot
        gh_x = np.concatenate([self.tail["gh"], gh]) if t else gh
        if (t == 0 and slot_x[0] != 0) or np.any((slot_x[1:] > 0) & ((slot_x[1:] != slot_x[:-1] + 1) | (gh_x[1:] != gh_x[:-1]))):
            raise NotAdjacent()
        counted = ~missing if missing.any() else None
        first = slot == 0
        self.seen += np.bincount(gh[first & counted if counted is not None else first] // g.ep_size, minlength=len(self.seen))
        code_x = np.concatenate([self.tail["code"], code]) if t else code
        if self.coact is not None:
            self._add_coact(slot, code, code_x, t)
        for policy, traffic in self.traffic.items():
            if policy in self.dev:
                self._add_single(policy, traffic, slot, gh, home, code, code_x, t, counted)
            else:
                self._add_replicated(policy, traffic, slot, gh, home, code, counted)
        keep = min(self.k - 1, len(slot_x))
        self.tail = {"slot": slot_x[len(slot_x) - keep:], "gh": gh_x[len(gh_x) - keep:], "code": code_x[len(code_x) - keep:]}

    def _partners(self, slot, values, values_x, t, fn):
        """fn(mask, this, partner) for every offset o: rows whose slot >= o against the row o before them."""
        n = len(slot)
        for o in range(1, self.k):
            lo = max(0, o - t)
            if lo >= n:
                break
            fn(lo, slot[lo:] >= o, values[lo:], values_x[t + lo - o: t + n - o])

    def _add_coact(self, slot, code, code_x, t) -> None:
        e = self.grid.e_max

        def pairs(lo, m, this, partner):
            a, b = partner[m], this[m]
            # codes are l·E + e, so (l, e_a, e_b) flattens to code_a·E + e_b; both orders
            self.coact += np.bincount(a * e + b % e, minlength=len(self.coact))
            self.coact += np.bincount(b * e + a % e, minlength=len(self.coact))
        self._partners(slot, code, code_x, t, pairs)

    def _add_single(self, policy, traffic: Traffic, slot, gh, home, code, code_x, t, counted) -> None:
        """A copy per distinct remote device (and node) among the token's experts."""
        g = self.grid
        lut = self.dev[policy]
        levels = [(lut, home, False)]
        if g.ep_size > g.gpus_per_node:
            levels.append((lut // g.gpus_per_node, home // g.gpus_per_node, True))
        for where_lut, origin, internode in levels:
            where = where_lut[code]
            where_x = where_lut[code_x[:t]] if t else where[:0]
            where_ext = np.concatenate([where_x, where]) if t else where
            fresh = np.ones(len(slot), dtype=bool)

            def dedup(lo, m, this, partner):
                fresh[lo:] &= ~(m & (this == partner))
            self._partners(slot, where, where_ext, t, dedup)
            remote = fresh & (where != origin)
            if counted is not None:
                remote &= counted
            gr = gh[remote]
            if internode:
                traffic.sent_internode += np.bincount(gr, minlength=g.size)
            else:
                traffic.sent += np.bincount(gr, minlength=g.size)
                traffic.recv += np.bincount(gr - home[remote] + where[remote], minlength=g.size)

    def _add_replicated(self, policy, traffic: Traffic, slot, gh, home, code, counted) -> None:
        """Replicas: device d is reached unless every chosen expert's replica is elsewhere, 1 − Π_e (1 − f[e, d]).

        Node n likewise with F[e, n] = Σ_{d in n} f[e, d]. Copies are expectations over the
        uniform replica choice. Columns: G devices, then the nodes.
        """
        miss_nX = self.miss[policy][code]
        starts = np.flatnonzero(slot == 0)
        prev = self.pending.pop(policy, None)
        head_end = starts[0] if len(starts) else len(slot)
        if prev is not None:  # rows before the first start finish the token the last batch cut
            self._emit(traffic, prev[0] * miss_nX[:head_end].prod(0)[None], prev[1], prev[2])
        if not len(starts):
            return
        prod_TX = np.multiply.reduceat(miss_nX[head_end:], starts - head_end, axis=0)
        ok_T = np.ones(len(starts), dtype=bool) if counted is None else counted[starts]
        gh_T, home_T = np.where(ok_T, gh[starts], -1), home[starts]
        self.pending[policy] = (prod_TX[-1:], gh_T[-1:], home_T[-1:])  # the last token may go on in the next batch
        self._emit(traffic, prod_TX[:-1], gh_T[:-1], home_T[:-1])

    def _emit(self, traffic: Traffic, prod_TX, gh_T, home_T) -> None:
        g = self.grid
        keep = gh_T >= 0
        prod_TX, gh_T, home_T = prod_TX[keep], gh_T[keep], home_T[keep]
        if not len(gh_T):
            return
        rows = np.arange(len(gh_T))
        reach_TX = 1.0 - prod_TX
        reach_TX[rows, home_T] = 0.0
        reach_TX[rows, g.ep_size + home_T // g.gpus_per_node] = 0.0
        traffic.sent += np.bincount(gh_T, weights=reach_TX[:, :g.ep_size].sum(1), minlength=g.size)
        traffic.recv += np.bincount(((gh_T - home_T)[:, None] + np.arange(g.ep_size)).ravel(),
                                    weights=reach_TX[:, :g.ep_size].ravel(), minlength=g.size)
        traffic.sent_internode += np.bincount(gh_T, weights=reach_TX[:, g.ep_size:].sum(1), minlength=g.size)

    def finish(self) -> None:
        """Count the tokens still held back at the end of the stream."""
        for policy, (prod, gh_T, home_T) in self.pending.items():
            self._emit(self.traffic[policy], prod, gh_T, home_T)
        self.pending = {}


# The signature path holds, per placement, tables of L · E^K · G values; above this it replays rows instead.
SIGNATURE_TABLE_MAX = 1 << 24
# Counts over at most this many (step, layer, home, signature) cells are priced densely (tensor contractions).
DENSE_COUNTS_MAX = 1 << 23
# A count over at most this many (step, cell, signature) slots adds every batch into one array (8 bytes a slot).
DENSE_COUNTER_MAX = 1 << 22
# Signature counts kept between queries (CACHE), in (step, cell, signature) entries over all runs.
HISTOGRAM_CACHE_ENTRIES = 1 << 23


@dataclasses.dataclass
class SignatureTables:
    """What one token costs under a placement, by (layer, home, chosen experts in slot order = signature s)."""

    sent_LGS: np.ndarray   # expected remote devices reached
    reach_LSG: np.ndarray  # P(device d reached), home included (zeroed at use)
    inter_LGS: np.ndarray  # expected remote nodes reached


def signature_tables(f_LEG: np.ndarray, k: int, gpus_per_node: int) -> SignatureTables:
    """Device d is reached unless every chosen expert's replica is elsewhere: 1 − Π_k (1 − f[e_k, d]); nodes alike."""
    n_l, e, g = f_LEG.shape
    digits_SK = np.array(list(itertools.product(range(e), repeat=k)), dtype=np.int64).reshape(-1, k)
    nodes = g // gpus_per_node
    f_LEN = f_LEG.reshape(n_l, e, nodes, gpus_per_node).sum(3)
    reach = []
    for f in (f_LEG, f_LEN):
        miss = np.ones((n_l, len(digits_SK), f.shape[2]))
        for j in range(k):
            miss *= 1.0 - f[:, digits_SK[:, j], :]
        reach.append(1.0 - miss)
    reach_LSG, reach_LSN = reach
    node_of_home = np.arange(g) // gpus_per_node
    sent_LGS = (reach_LSG.sum(2)[:, None, :] - reach_LSG.transpose(0, 2, 1))
    inter_LGS = (reach_LSN.sum(2)[:, None, :] - reach_LSN.transpose(0, 2, 1)[:, node_of_home, :])
    return SignatureTables(sent_LGS, reach_LSG, inter_LGS)


@dataclasses.dataclass(frozen=True)
class Space:
    """How tokens are counted: per step, cell = layer index · G + home, signature = experts in slot order, base E."""

    layers: tuple[int, ...]
    ep_size: int
    e_max: int
    k: int

    @property
    def cells(self) -> int:
        return len(self.layers) * self.ep_size

    @property
    def n_sig(self) -> int:
        return self.e_max ** self.k

    def fits(self) -> bool:
        """Whether one placement's tables (L · E^K · G values) stay within SIGNATURE_TABLE_MAX."""
        return self.cells * self.n_sig <= SIGNATURE_TABLE_MAX

    def select_sql(self, lo: int, width: str) -> str:
        """key = (step − lo) · cells + layer index · G + home, and the expert: what the signature counts read per row.

        Not the slot: the probe writes a token's K rows consecutively, and SignatureCounter
        checks that each group of K rows shares its key and has K distinct experts (what a
        token's rows have). Decoding slot would cost about a third of the scan.
        """
        g = self.ep_size
        home = f"(pos & {g - 1})" if g & (g - 1) == 0 else f"(pos % {g})"
        step = f"(step - {int(lo)})::{width}"
        return f"({step} * {self.cells} + {layer_index_sql(np.asarray(self.layers))}::{width} * {g} + {home}) AS key, expert"


def layer_index_sql(layers: np.ndarray) -> str:
    lo = int(layers[0])
    if np.array_equal(layers, np.arange(lo, lo + len(layers))):
        return f"(layer - {lo})"
    return "CASE layer " + " ".join(f"WHEN {int(x)} THEN {i}" for i, x in enumerate(layers)) + " END"


def key_width(lo: int, hi: int, cells: int) -> str | None:
    """The SQL type of keys for steps lo..hi: INTEGER while they fit (half the bytes out of DuckDB), None past BIGINT."""
    span = (int(hi) - int(lo) + 1) * cells
    return "INTEGER" if span < 2**31 else "BIGINT" if span < 2**62 else None


@dataclasses.dataclass
class Counts:
    """Tokens by (step, cell, signature): cell_sig = cell · E^K + signature."""

    step: np.ndarray
    cell_sig: np.ndarray
    count: np.ndarray
    source: tuple | None = None  # what they were counted from (kept counts: equal sources, equal counts)

    @property
    def size(self) -> int:
        return len(self.step)

    @staticmethod
    def join(parts: list[Counts]) -> Counts:
        if len(parts) == 1:
            return parts[0]
        return Counts(*(np.concatenate([getattr(p, f) for p in parts]) if parts else np.zeros(0, t)
                        for f, t in (("step", np.int64), ("cell_sig", np.int64), ("count", np.float64))))


class SignatureCounter:
    """Counts tokens by (step, cell, signature) over batches of (key, expert) rows in write order.

    Needs every token to have exactly K consecutive rows (the probe's layout, slot order);
    NotAdjacent when a group of K rows is not one token's (keys differ or an expert repeats),
    and the caller falls back to the row-by-row Replay.
    """

    def __init__(self, space: Space, lo: int, hi: int | None = None):
        self.space, self.lo = space, int(lo)
        self.rest: tuple[np.ndarray, np.ndarray] | None = None  # rows of a token the batch end cut
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []
        # Steps lo..hi known and few cells: one array of counts, so no batch is compacted or merged at the end.
        span = None if hi is None else (int(hi) - self.lo + 1) * space.cells * space.n_sig
        self.dense = np.zeros(span, np.int64) if span is not None and 0 < span <= DENSE_COUNTER_MAX else None

    def add(self, c: dict[str, np.ndarray]) -> None:
        key, expert = c["key"], c["expert"]
        if self.rest is not None:
            key, expert = np.concatenate([self.rest[0], key]), np.concatenate([self.rest[1], expert])
        k, e = self.space.k, self.space.e_max
        whole = len(key) - len(key) % k
        self.rest = (key[whole:], expert[whole:]) if whole < len(key) else None
        if not whole:
            return
        key_T = key[0:whole:k]
        digits = [expert[j:whole:k] for j in range(k)]
        for j in range(1, k):
            if not np.array_equal(key[j:whole:k], key_T) or any(np.any(digits[j] == digits[i]) for i in range(j)):
                raise NotAdjacent()
        if max(int(d.max()) for d in digits) >= e:  # an expert id past E (bad data) counts as the last
            digits = [np.minimum(d, e - 1) for d in digits]
        # idx = key · E^K + signature, by Horner's rule in place, in 32 bits while it fits
        n_sig = self.space.n_sig
        idx = key_T.astype(np.int32 if (int(key_T.max()) + 1) * n_sig < 2**31 else np.int64)
        for d in digits:
            idx *= e
            idx += d
        lo, hi = int(idx.min()), int(idx.max())
        if self.dense is not None and 0 <= lo and hi < len(self.dense):
            if hi - lo < 4 * len(idx) + 4096:
                self.dense[lo:hi + 1] += np.bincount(idx - lo if lo else idx, minlength=hi - lo + 1)
            else:
                u, c = np.unique(idx, return_counts=True)
                self.dense[u] += c
        elif hi - lo < 4 * len(idx) + 4096:
            counts = np.bincount(idx - lo if lo else idx)
            nz = np.flatnonzero(counts)
            self.parts.append((nz.astype(np.int64) + lo, counts[nz]))
        else:
            self.parts.append(np.unique(idx.astype(np.int64), return_counts=True))

    def finish(self) -> Counts:
        if self.rest is not None:
            raise NotAdjacent()  # the last token has fewer than K rows
        if self.dense is not None:
            nz = np.flatnonzero(self.dense)
            self.parts.append((nz, self.dense[nz]))
            self.dense = None
        if not self.parts:
            return Counts.join([])
        u = np.concatenate([p[0] for p in self.parts])
        cnt = np.concatenate([p[1] for p in self.parts]).astype(np.float64)
        if len(self.parts) > 1:  # a step cut by a batch end appears twice
            u, cnt = sum_by_value(u, cnt)
        per = self.space.cells * self.space.n_sig
        return Counts(u // per + self.lo, u % per, cnt)


def sum_by_value(u: np.ndarray, cnt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct values of u ascending, the sum of cnt over each). Batches read in step order (one writer) come
    ascending already: equal neighbours are joined without a sort."""
    if len(u) and np.all(u[1:] >= u[:-1]):
        starts = np.r_[0, np.flatnonzero(u[1:] != u[:-1]) + 1]
        return u[starts], np.add.reduceat(cnt, starts)
    values, inv = np.unique(u, return_inverse=True)
    return values, np.bincount(inv, weights=cnt, minlength=len(values)).astype(cnt.dtype, copy=False)


# Signature counts of routing segments already read, per (store, run, space, row filter): (segments, counts).
# A retired segment (compaction, deletion) drops its entry; a run's new segments are read and added.
CACHE = BoundedMemo(HISTOGRAM_CACHE_ENTRIES)


def histogram(store, run: str, space: Space, filters: str, params: list, windows: list[tuple[int, int]]) -> Counts:
    """Token signature counts of every routing segment that may hold a step of the windows (lo, hi) (whole segments).

    filters: the row filter (layers, checkpoint, phase, ranks), no steps. Segments read before
    come from CACHE. Raises NotAdjacent when rows are not in the probe's layout, or when a
    segment's step range is unknown (no footer statistics).
    """
    files = store.segment_paths("routing", run)
    key = (str(store.root), run, space, filters, tuple(params))
    covered, parts = CACHE.get(key) or (frozenset(), [])
    if not covered <= set(files):
        covered, parts = frozenset(), []
    todo = [f for f in files if f not in covered]
    if todo:
        ranges = {f: footer.ranges.get("step") for f, footer in segment_footers.footers(store, run, todo).items()}
        if any(ranges.get(f) is None for f in todo):
            raise NotAdjacent()
        need = [f for f in todo if any(ranges[f][0] <= hi and ranges[f][1] >= lo for lo, hi in windows)]
        need.sort(key=lambda f: (ranges[f], f))  # in step order: one writer's batches then count ascending
        if need:
            lo, hi = min(ranges[f][0] for f in need), max(ranges[f][1] for f in need)
            width = key_width(lo, hi, space.cells)
            if width is None:
                raise NotAdjacent()
            counter = SignatureCounter(space, lo, hi)
            sql = (f"SELECT {space.select_sql(lo, width)} FROM read_parquet({sql_list(need)}, union_by_name=true) "
                   f"WHERE {filters}")
            for batch in stream_sql(store, run, sql, params, tables=()):
                counter.add(batch)
            parts = [*parts, counter.finish()]
            covered = covered | frozenset(need)
            CACHE.put(key, (covered, parts), sum(p.size for p in parts))
    return dataclasses.replace(Counts.join(parts), source=(key, covered))


def coactivation(counts: Counts, space: Space, steps: np.ndarray) -> np.ndarray:
    """C[l, i, j]: tokens at `steps` that chose both i and j (i ≠ j), from signature counts."""
    e, n_sig = space.e_max, space.n_sig
    keep = np.isin(counts.step, steps)
    cell_sig, cnt = counts.cell_sig[keep], counts.count[keep]
    layer_U, sig_U = cell_sig // n_sig // space.ep_size, cell_sig % n_sig
    digits = [(sig_U // e ** (space.k - 1 - j)) % e for j in range(space.k)]
    out = np.zeros(len(space.layers) * e * e)
    for a, b in itertools.permutations(range(space.k), 2):
        out += np.bincount((layer_U * e + digits[a]) * e + digits[b], weights=cnt, minlength=len(out))
    return out.reshape(len(space.layers), e, e)


class SignatureReplay:
    """Every placement's copies from signature counts: a gather through its tables per (step, cell, signature)."""

    def __init__(self, grid: Grid, tables: dict[str, np.ndarray], k: int):
        self.grid, self.k = grid, k
        self.n_sig = grid.e_max ** k
        self.seen = np.zeros(len(grid.steps) * len(grid.layers))
        self.tables = tables
        self.traffic = {p: Traffic(np.zeros(grid.size), np.zeros(grid.size), np.zeros(grid.size)) for p in tables}

    def add(self, counts: Counts) -> None:
        g = self.grid
        sidx = _search(g.steps, counts.step)
        ok = sidx >= 0  # a step expert_step never recorded, or outside the window: not counted
        cells = len(g.layers) * g.ep_size
        cell_sig, cnt_U, sidx = counts.cell_sig[ok], counts.count[ok], sidx[ok]
        n_g, n_l = g.ep_size, len(g.layers)
        if g.size * self.n_sig <= DENSE_COUNTS_MAX:
            # (step index, cell, signature) is already the dense array's flat index
            c = np.bincount(sidx * (cells * self.n_sig) + cell_sig, weights=cnt_U, minlength=g.size * self.n_sig)
            self.seen += c.reshape(len(self.seen), -1).sum(1)
            self._add_dense(c)
            return
        key_U, sig_U = sidx * cells + cell_sig // self.n_sig, cell_sig % self.n_sig
        self.seen += np.bincount(key_U // n_g, weights=cnt_U, minlength=len(self.seen))
        home_U, layer_U = key_U % n_g, (key_U // n_g) % n_l
        # flat indexes into the (L, G, S) and (L·S, G) tables, once for every placement
        lhs_U = (layer_U * n_g + home_U) * self.n_sig + sig_U
        ls_U = layer_U * self.n_sig + sig_U
        at_home = np.arange(len(key_U)) * n_g + home_U
        recv_idx = ((key_U - home_U)[:, None] + np.arange(n_g)).ravel()
        for policy, f_LEG in self.tables.items():  # one placement's tables at a time: memory stays at one
            tab = signature_tables(f_LEG, self.k, g.gpus_per_node)
            t = self.traffic[policy]
            t.sent += np.bincount(key_U, weights=cnt_U * tab.sent_LGS.take(lhs_U), minlength=g.size)
            reach_UG = tab.reach_LSG.reshape(-1, n_g).take(ls_U, axis=0)
            reach_UG *= cnt_U[:, None]
            reach_UG.ravel()[at_home] = 0.0  # a token's own device receives nothing
            t.recv += np.bincount(recv_idx, weights=reach_UG.ravel(), minlength=g.size)
            t.sent_internode += np.bincount(key_U, weights=cnt_U * tab.inter_LGS.take(lhs_U), minlength=g.size)

    def _add_dense(self, c: np.ndarray) -> None:
        """The counts as a dense (step, layer, home, signature) array: each placement is then a few tensor contractions."""
        g = self.grid
        n_s, n_l, n_g = len(g.steps), len(g.layers), g.ep_size
        c = c.reshape(n_s, n_l, n_g, self.n_sig)
        c_any = c.sum(2)  # tokens by (step, layer, signature), whatever their home
        for policy, f_LEG in self.tables.items():
            tab = signature_tables(f_LEG, self.k, g.gpus_per_node)
            t = self.traffic[policy]
            t.sent += np.einsum("slgq,lgq->slg", c, tab.sent_LGS).ravel()
            # device d receives every token reaching it, less those living on d
            recv = np.einsum("slq,lqd->sld", c_any, tab.reach_LSG, optimize=True)
            recv -= np.einsum("sldq,lqd->sld", c, tab.reach_LSG)
            t.recv += recv.ravel()
            t.sent_internode += np.einsum("slgq,lgq->slg", c, tab.inter_LGS).ravel()


def _search(offsets: np.ndarray, s: np.ndarray) -> np.ndarray:
    i = np.minimum(np.searchsorted(offsets, s), len(offsets) - 1)
    return np.where(offsets[i] == s, i, -1)


def stream(store, run: str, cols: str, where: str, params: list, *, ordered: bool):
    """Batches of `SELECT cols FROM routing WHERE where`, in write order unless ordered (then in token order)."""
    order = " ORDER BY step, layer, rank, microbatch, seq, pos, checkpoint, slot" if ordered else ""
    return stream_sql(store, run, f"SELECT {cols} FROM routing WHERE {where}{order}", params, tables=("routing",))


def stream_sql(store, run: str, sql: str, params: list, *, tables=("routing",)):
    """Batches (dicts of numpy columns) of one query, in the order DuckDB returns them.

    A background thread pulls the batches out of DuckDB while the caller works on the
    previous one, so the scan and the numpy work overlap on two cores.
    """
    out: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()
    done = object()

    def produce():
        try:
            con = store.connect(run, tables=tables)
            try:
                reader = con.sql(sql, params=params or None).to_arrow_reader(BATCH_ROWS)
                for batch in reader:
                    if stop.is_set():
                        break
                    out.put({f.name: batch.column(i).to_numpy(zero_copy_only=False) for i, f in enumerate(batch.schema)})
            finally:
                con.close()
        except BaseException as exc:  # handed to the consumer, which raises it
            out.put(exc)
        finally:
            out.put(done)

    worker = threading.Thread(target=produce, name="placement-replay-scan", daemon=True)
    worker.start()
    try:
        while (item := out.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                out.get(timeout=0.05)
            except queue.Empty:
                pass
        worker.join()
