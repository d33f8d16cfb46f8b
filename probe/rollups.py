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

from moescope.schema import ROLLUP_QUANTILES, ROLLUPS, SKETCH_STATS
from moescope.sketch import group_quantiles, sketch_bins

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
        one = lambda v: np.array([v])  # noqa: E731
        steps, hist = [], []
        for key, v in self._tok.items():
            cols = {"tokens": one(int(v[0])), "entropy_sum": one(v[1]), "margin_sum": one(v[2]),
                    "z_tokens": one(int(v[3])), "z_sum": pa.array([float(v[4])], mask=np.array([v[3] == 0]))}
            for s, stat in enumerate(SKETCH_STATS):
                x = np.concatenate([part[s] for part in self._values[key]])
                x = x[np.isfinite(x)]
                qs = group_quantiles(np.zeros(x.size, np.int64), 1, x, ROLLUP_QUANTILES)[0]
                cols.update({f"{stat}_p{round(q * 100):02d}": pa.array([v], mask=np.array([np.isnan(v)]))
                             for q, v in zip(ROLLUP_QUANTILES, qs)})
                bins, counts = np.unique(sketch_bins(x), return_counts=True)
                hist.append((key, {"stat": np.full(bins.size, stat, object), "bin": bins, "tokens": counts}))
            steps.append((key, cols))
        out = {"token_step": _table("token_step", run, steps), "token_hist": _table("token_hist", run, hist)}
        dom = []
        for key, doms in self._domain.items():
            for d, c in doms.items():
                x = np.flatnonzero(c[0])
                dom.append((key, {"domain": np.array([d] * len(x), object), "expert": x, "routed": c[0, x], "top1": c[1, x]}))
        out["domain_step"] = _table("domain_step", run, dom)
        coact = []
        for key, co in self._coact.items():
            i, j = np.nonzero(co)
            coact.append((key, {"expert_i": i, "expert_j": j, "together": co[i, j]}))
        out["coact_step"] = _table("coact_step", run, coact)
        out["repeat_step"] = _table("repeat_step", run, [
            (key, {"pairs": one(v[0]), "top1_repeat": one(v[1]), "topk_overlap": one(v[2])})
            for key, v in self._repeat.items() if v[0]])
        self.__init__()
        return out


def _table(name: str, run: str, items: list[tuple[Key, dict]]) -> pa.Table:
    """Rows of each key (its columns of equal length) under the key's context columns."""
    schema = ROLLUPS[name]
    if not items:
        return schema.empty_table()
    parts = []
    for (checkpoint, step, rank, phase, layer), values in items:
        n = len(next(iter(values.values())))
        ctx = {"run": pa.array([run] * n), "checkpoint": pa.array([checkpoint] * n), "step": np.full(n, step),
               "rank": np.full(n, rank), "layer": np.full(n, layer), "phase": pa.array([phase] * n, pa.string())}
        parts.append(pa.table({**ctx, **values}).select(schema.names).cast(schema))
    return pa.concat_tables(parts)


def _add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sum of two count arrays whose trailing sizes may differ (a layer's expert count seen growing)."""
    shape = tuple(max(x, y) for x, y in zip(a.shape, b.shape))
    out = np.zeros(shape, np.int64)
    out[tuple(slice(0, n) for n in a.shape)] += a
    out[tuple(slice(0, n) for n in b.shape)] += b
    return out
