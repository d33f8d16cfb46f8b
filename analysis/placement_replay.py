"""Streamed replay of routing rows for the placement what-if: all-to-all copies and co-activation.

Legend: G devices, L layers of the window, E experts (the largest layer), K top-k, n rows
of a batch, S = E^K signatures (a token's chosen experts in slot order), f[l, e, d] the
share of expert e's tokens that device d computes under a placement.

Rows are read in the order they were written, where the probe keeps a token's K slots
consecutive (slot 0 first): a token is its run of rows, so no per-token GROUP BY (the
expensive part of doing this in SQL). DuckDB turns each row into two small ints in
parallel (key = (step, layer, home device), code = expert, slot); numpy checks the
layout, builds a histogram of tokens by (key, signature) per batch and prices it with
per-placement tables (SignatureReplay). Tokens with varying K replay row by row
(Replay); rows written in another order are replayed sorted by token. A background
thread scans the next batch while numpy works on the current one.
"""
from __future__ import annotations

import dataclasses
import itertools
import queue
import threading

import numpy as np

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

    def _layer_sql(self) -> str:
        lo = int(self.layers[0])
        if np.array_equal(self.layers, np.arange(lo, lo + len(self.layers))):
            return f"(layer - {lo})"
        return "CASE layer " + " ".join(f"WHEN {int(x)} THEN {i}" for i, x in enumerate(self.layers)) + " END"

    def step_filter(self) -> str:
        lo, stride = int(self.steps[0]), self.stride
        between = f"step BETWEEN {lo} AND {int(self.steps[-1])}"
        return between if stride == 1 else f"{between} AND (step - {lo}) % {stride} = 0"

    def _offset_sql(self) -> str:
        lo, stride = int(self.steps[0]), self.stride
        return f"(step - {lo})" if stride == 1 else f"((step - {lo}) // {stride})"

    def select_sql(self) -> str:
        """Row path columns: step offset, layer·G + home, home, expert code l·E + e, slot."""
        g, li = self.ep_size, self._layer_sql()
        return (f"{self._offset_sql()}::BIGINT AS s, ({li} * {g} + pos % {g})::INTEGER AS lh, "
                f"(pos % {g})::INTEGER AS home, ({li} * {self.e_max} + least(expert, {self.e_max - 1}))::INTEGER AS code, "
                f"slot::INTEGER AS slot")

    def signature_sql(self, k: int) -> str:
        """Signature path columns: key = (step offset · L + layer) · G + home, and code = expert · K + slot."""
        g, n_l = self.ep_size, len(self.layers)
        # 32-bit keys while the step offsets allow: half the bytes out of DuckDB
        width = "INTEGER" if (int(self.steps[-1] - self.steps[0]) // self.stride + 1) * n_l * g < 2**31 else "BIGINT"
        return (f"(({self._offset_sql()} * {n_l} + {self._layer_sql()}) * {g} + pos % {g})::{width} AS key, "
                f"(expert * {k} + slot)::INTEGER AS code")


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


class SignatureReplay:
    """Histogram of tokens by (step, layer, home, signature) per batch, evaluated per placement through its tables.

    Needs every token to have exactly K rows, slot 0..K−1 in order (the probe's layout);
    NotAdjacent otherwise, and the caller falls back to the row-by-row Replay.
    """

    def __init__(self, grid: Grid, tables: dict[str, np.ndarray], k: int, coactivation: bool):
        self.grid, self.k = grid, k
        self.lut = grid.step_lut()
        self.identity = self.lut is not None and np.array_equal(self.lut, np.arange(len(self.lut)))
        self.n_sig = grid.e_max ** k
        self.seen = np.zeros(len(grid.steps) * len(grid.layers))
        self.coact = np.zeros(len(grid.layers) * grid.e_max * grid.e_max) if coactivation else None
        self.tabs = {p: signature_tables(t, k, grid.gpus_per_node) for p, t in tables.items()}
        self.traffic = {p: Traffic(np.zeros(grid.size), np.zeros(grid.size), np.zeros(grid.size)) for p in tables}
        self.rest: dict[str, np.ndarray] | None = None  # rows of a token the batch end cut

    @staticmethod
    def fits(grid: Grid, k: int, n_policies: int) -> bool:
        return len(grid.layers) * grid.e_max ** k * grid.ep_size * max(1, n_policies) <= SIGNATURE_TABLE_MAX

    def add(self, c: dict[str, np.ndarray]) -> None:
        key, code = c["key"], c["code"]
        if self.rest is not None:
            key, code = np.concatenate([self.rest["key"], key]), np.concatenate([self.rest["code"], code])
        whole = len(key) - len(key) % self.k
        self.rest = {"key": key[whole:], "code": code[whole:]} if whole < len(key) else None
        key, code = key[:whole], code[:whole]
        if not whole:
            return
        k, e = self.k, self.grid.e_max
        key_T = key[0::k].astype(np.int64)
        sig_T = np.zeros(len(key_T), dtype=np.int64)
        for j in range(k):
            code_j = code[j::k]
            if np.any(code_j % k != j) or (j and np.any(key[j::k] != key_T)):
                raise NotAdjacent()
            sig_T = sig_T * e + np.minimum(code_j // k, e - 1)  # an expert id past E (bad data) counts as the last
        per_step = len(self.grid.layers) * self.grid.ep_size
        if not self.identity:  # step offsets with gaps: map them onto the window's steps, drop the ones it lacks
            off = key_T // per_step
            sidx = self.lut[off] if self.lut is not None else _search((self.grid.steps - self.grid.steps[0]) // self.grid.stride, off)
            ok = sidx >= 0
            key_T, sig_T = (sidx * per_step + key_T % per_step)[ok], sig_T[ok]
        if not len(key_T):
            return
        idx = key_T * self.n_sig + sig_T
        lo, hi = int(idx.min()), int(idx.max())
        if hi - lo < 4 * len(idx) + 4096:
            counts = np.bincount(idx - lo)
            nz = np.flatnonzero(counts)
            u, cnt = nz + lo, counts[nz].astype(np.float64)
        else:
            u, cnt_i = np.unique(idx, return_counts=True)
            cnt = cnt_i.astype(np.float64)
        self._evaluate(u // self.n_sig, u % self.n_sig, cnt)

    def _evaluate(self, key_U, sig_U, cnt_U) -> None:
        g = self.grid
        size, n_g, n_l = g.size, g.ep_size, len(g.layers)
        home_U, layer_U = key_U % n_g, (key_U // n_g) % n_l
        self.seen += np.bincount(key_U // n_g, weights=cnt_U, minlength=len(self.seen))
        if self.coact is not None:
            digits = [(sig_U // g.e_max ** (self.k - 1 - j)) % g.e_max for j in range(self.k)]
            for a, b in itertools.permutations(range(self.k), 2):
                self.coact += np.bincount((layer_U * g.e_max + digits[a]) * g.e_max + digits[b], weights=cnt_U,
                                          minlength=len(self.coact))
        rows = np.arange(len(key_U))
        for policy, tab in self.tabs.items():
            t = self.traffic[policy]
            t.sent += np.bincount(key_U, weights=cnt_U * tab.sent_LGS[layer_U, home_U, sig_U], minlength=size)
            reach_UG = tab.reach_LSG[layer_U, sig_U] * cnt_U[:, None]
            reach_UG[rows, home_U] = 0.0
            t.recv += np.bincount(((key_U - home_U)[:, None] + np.arange(n_g)).ravel(), weights=reach_UG.ravel(), minlength=size)
            t.sent_internode += np.bincount(key_U, weights=cnt_U * tab.inter_LGS[layer_U, home_U, sig_U], minlength=size)

    def finish(self) -> None:
        if self.rest is not None:
            raise NotAdjacent()  # the last token has fewer than K rows


def _search(offsets: np.ndarray, s: np.ndarray) -> np.ndarray:
    i = np.minimum(np.searchsorted(offsets, s), len(offsets) - 1)
    return np.where(offsets[i] == s, i, -1)


def stream(store, run: str, cols: str, where: str, params: list, *, ordered: bool):
    """Batches (dicts of numpy columns) of `SELECT cols FROM routing WHERE where`, in write order unless ordered.

    A background thread pulls the batches out of DuckDB while the caller works on the
    previous one, so the scan and the numpy work overlap on two cores.
    """
    order = " ORDER BY step, layer, rank, microbatch, seq, pos, checkpoint, slot" if ordered else ""
    out: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()
    done = object()

    def produce():
        try:
            con = store.connect(run)
            try:
                reader = con.sql(f"SELECT {cols} FROM routing WHERE {where}{order}", params=params).to_arrow_reader(BATCH_ROWS)
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
