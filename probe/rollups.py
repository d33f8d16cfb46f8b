"""The probe's rollups: per-token statistics summed per (checkpoint, step, rank, phase, layer).

What the dashboard reads per token (moescope.schema.ROLLUPS) is counted here, from
each router call's dense (T, k) expert ids, over every real token of the forward —
not only the sampled sequences — so, like expert_step, the rollups stay exact when
per-token rows are sampled. A call is a few bincounts over T·k values, paid in the
probe's background thread rather than by the ingest worker (which recomputes them only
for frames that arrive without: imports, other producers).
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow as pa

from moescope.schema import ROLLUP_QUANTILES, ROLLUPS, SKETCH_STATS, SKETCH_ZERO_BIN
from moescope.sketch import sketch_bins

Key = tuple  # (checkpoint, step, rank, phase, layer)


class RollupAccumulator:
    def __init__(self) -> None:
        self._tok: dict[Key, np.ndarray] = {}          # tokens, entropy_sum, margin_sum, z_tokens, z_sum
        self._values: dict[Key, list[tuple]] = defaultdict(list)  # (entropy, margin, z) per call
        self._domain: dict[Key, dict[str, np.ndarray]] = defaultdict(dict)  # domain -> (2, E) routed, top1
        self._coact: dict[Key, np.ndarray] = {}        # E x E
        self._repeat: dict[Key, np.ndarray] = {}       # pairs, top1_repeat, topk_overlap

    def __bool__(self) -> bool:
        return bool(self._tok)

    def add_call(self, key: Key, ids_TK: np.ndarray, stats_T3: np.ndarray, seq_T: np.ndarray, pos_T: np.ndarray,
                 valid_T: np.ndarray, domain_T: np.ndarray, domain_values: list[str], num_experts: int) -> None:
        """Fold one router call in: its real tokens' ids (-1 = empty slot), stats (entropy, logsumexp, margin)."""
        real = np.flatnonzero(valid_T)
        if real.size == 0:
            return
        ids, stats, seq, pos, dom = ids_TK[real].astype(np.int64), stats_T3[real], seq_T[real], pos_T[real], domain_T[real]
        e = max(int(num_experts), int(ids.max()) + 1 if ids.size else 0)
        entropy, lse, margin = (stats[:, i].astype(np.float64) for i in range(3))
        z_ok = np.isfinite(lse)
        z = lse * lse
        tok = np.array([real.size, entropy.sum(), margin.sum(), z_ok.sum(), z[z_ok].sum()])
        self._tok[key] = tok if key not in self._tok else self._tok[key] + tok
        self._values[key].append((entropy, margin, z))

        chosen = ids >= 0
        if domain_values:
            for d in np.unique(dom[dom >= 0]):
                rows = dom == d
                sel = ids[rows]
                m = sel >= 0
                counts = np.stack([np.bincount(sel[m], minlength=e), np.bincount(sel[:, 0][m[:, 0]], minlength=e)])
                acc = self._domain[key].get(domain_values[d])
                self._domain[key][domain_values[d]] = counts if acc is None else _add(acc, counts)

        # Ordered pairs of each token's chosen experts, (i, i) included: the co-activation counts.
        k = ids.shape[1]
        both = (chosen[:, :, None] & chosen[:, None, :])
        pair = (ids[:, :, None] * e + ids[:, None, :])[both]
        co = np.bincount(pair, minlength=e * e).reshape(e, e)
        self._coact[key] = co if key not in self._coact else _add(self._coact[key], co)

        # Adjacent positions of one sequence, both in this call.
        adj = (seq[1:] == seq[:-1]) & (pos[1:] == pos[:-1] + 1)
        cur, prev = ids[1:][adj], ids[:-1][adj]
        overlap = np.zeros(len(cur), bool)
        for a in range(k):
            for b in range(k):
                overlap |= (cur[:, a] == prev[:, b]) & (cur[:, a] >= 0)
        rep = np.array([len(cur), int((cur[:, 0] == prev[:, 0]).sum()) if k else 0, int(overlap.sum())])
        self._repeat[key] = rep if key not in self._repeat else self._repeat[key] + rep

    def tables(self, run: str) -> dict[str, pa.Table]:
        """The pending rollups as tables of the record contract; clears them."""
        keys = list(self._tok)
        tok = np.array([self._tok[key] for key in keys]).reshape(len(keys), 5)
        step_cols = {"tokens": tok[:, 0].astype(np.int64), "entropy_sum": tok[:, 1], "margin_sum": tok[:, 2],
                     "z_tokens": tok[:, 3].astype(np.int64), "z_sum": _nulls_for(tok[:, 4], tok[:, 3] == 0)}
        hist_keys, hist_cols = [], {"stat": [], "bin": [], "tokens": []}
        for s, stat in enumerate(SKETCH_STATS):
            qs = np.full((len(keys), len(ROLLUP_QUANTILES)), np.nan)
            xs, gs = [], []
            for i, key in enumerate(keys):
                x = np.concatenate([part[s] for part in self._values[key]])
                x = x[np.isfinite(x)]
                if x.size:  # linear interpolation, as DuckDB's quantile_cont (a partition, not a sort)
                    qs[i] = np.quantile(x, ROLLUP_QUANTILES)
                xs.append(x)
                gs.append(np.full(x.size, i, np.int64))
            step_cols.update({f"{stat}_p{round(q * 100):02d}": _nulls_for(qs[:, j], np.isnan(qs[:, j]))
                              for j, q in enumerate(ROLLUP_QUANTILES)})
            key_of, bins, counts = _bin_counts(_cat(gs), sketch_bins(_cat(xs)), len(keys))
            hist_keys.append(key_of)
            hist_cols["stat"].append(np.full(bins.size, stat, object))
            hist_cols["bin"].append(bins)
            hist_cols["tokens"].append(counts)
        out = {"token_step": _table("token_step", run, keys, np.arange(len(keys)), step_cols),
               "token_hist": _table("token_hist", run, keys, np.concatenate(hist_keys) if hist_keys else np.zeros(0, int),
                                    {c: np.concatenate(v) for c, v in hist_cols.items()})}
        idx, dom_cols = [], {"domain": [], "expert": [], "routed": [], "top1": []}
        for i, key in enumerate(keys):
            for d, c in self._domain.get(key, {}).items():
                x = np.flatnonzero(c[0])
                idx.append(np.full(x.size, i))
                dom_cols["domain"].append(np.full(x.size, d, object))
                dom_cols["expert"].append(x)
                dom_cols["routed"].append(c[0, x])
                dom_cols["top1"].append(c[1, x])
        out["domain_step"] = _table("domain_step", run, keys, _cat(idx), {c: _cat(v) for c, v in dom_cols.items()})
        idx, co_cols = [], {"expert_i": [], "expert_j": [], "together": []}
        for i, key in enumerate(keys):
            co = self._coact.get(key)
            if co is None:
                continue
            a, b = np.nonzero(co)
            idx.append(np.full(a.size, i))
            co_cols["expert_i"].append(a)
            co_cols["expert_j"].append(b)
            co_cols["together"].append(co[a, b])
        out["coact_step"] = _table("coact_step", run, keys, _cat(idx), {c: _cat(v) for c, v in co_cols.items()})
        rep = [(i, self._repeat[key]) for i, key in enumerate(keys) if key in self._repeat and self._repeat[key][0]]
        r = np.array([v for _, v in rep], np.int64).reshape(len(rep), 3)
        out["repeat_step"] = _table("repeat_step", run, keys, np.array([i for i, _ in rep], np.int64),
                                    {"pairs": r[:, 0], "top1_repeat": r[:, 1], "topk_overlap": r[:, 2]})
        self.__init__()
        return out


def _bin_counts(key_of: np.ndarray, bins: np.ndarray, n_keys: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(key, bin, count) of each occupied (key, bin): a bincount over the occupied bin range."""
    if not bins.size:
        return key_of, bins, key_of
    zero = bins == SKETCH_ZERO_BIN
    lo = int(bins[~zero].min()) if (~zero).any() else 0
    b = np.where(zero, 0, bins - lo + 1)  # the zero bin below every other
    width = int(b.max()) + 1
    counts = np.bincount(key_of * width + b, minlength=n_keys * width)
    code = np.flatnonzero(counts)
    b = code % width
    return code // width, np.where(b == 0, SKETCH_ZERO_BIN, b + lo - 1), counts[code]


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _nulls_for(values: np.ndarray, null: np.ndarray) -> pa.Array:
    return pa.array(values, mask=np.asarray(null, bool))


def _table(name: str, run: str, keys: list[Key], key_index: np.ndarray, columns: dict) -> pa.Table:
    """Rows whose context is keys[key_index[row]], then `columns`."""
    schema = ROLLUPS[name]
    if not len(key_index):
        return schema.empty_table()
    key_index = np.asarray(key_index, np.int64)
    ctx = list(zip(*keys))  # checkpoint, step, rank, phase, layer: one tuple each

    def strings(values) -> pa.Array:
        return pa.DictionaryArray.from_arrays(pa.array(key_index.astype(np.int32)), pa.array(list(values), pa.string()))

    table = pa.table({"run": pa.array(np.full(len(key_index), run, object), pa.string()),
                      "checkpoint": strings(ctx[0]), "step": np.asarray(ctx[1], np.int64)[key_index],
                      "rank": np.asarray(ctx[2], np.int64)[key_index], "layer": np.asarray(ctx[4], np.int64)[key_index],
                      "phase": strings(ctx[3]), **columns})
    return table.select(schema.names).cast(schema)


def _add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sum of two count arrays whose trailing sizes may differ (a layer's expert count seen growing)."""
    shape = tuple(max(x, y) for x, y in zip(a.shape, b.shape))
    out = np.zeros(shape, np.int64)
    out[tuple(slice(0, n) for n in a.shape)] += a
    out[tuple(slice(0, n) for n in b.shape)] += b
    return out
