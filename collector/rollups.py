"""Rollups the store derives for frames that arrive without them (imports, other producers).

The probe counts its rollups (moescope.schema.ROLLUPS) itself over every token
(moescope.probe.rollups); a frame whose meta lacks "rollups": true gets them here, from
its routing and token_stats rows, so every run has them and a page reads a few rows per
(step, layer) instead of every token.

Everything is counting over dense integer group codes (numpy bincount), because this
runs on the ingest path: the equivalent SQL (GROUP BY, list() per token, a window for
adjacent positions) cost 3.6x the frame's Parquet write. Rows of one token are found
by sorting on (group, microbatch, seq, pos, slot), skipped when rows are already in
that order. Adjacent positions split across two frames are not counted by repeat_step.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from moescope.schema import ROLLUP_QUANTILES, ROLLUPS, SKETCH_STATS
from moescope.sketch import group_quantiles, sketch_bins

KEY = ("run", "checkpoint", "step", "rank", "layer", "phase")
_MAX_CODE = 1 << 62


def _codes(col) -> tuple[np.ndarray, int]:
    """Dense codes 0..n-1 of one column and n; integer codes keep the values' order, null is a code of its own."""
    if isinstance(col, np.ndarray):
        v = col.astype(np.int64, copy=False)
    elif pa.types.is_integer(col.type):
        v = np.asarray(col.to_numpy(zero_copy_only=False), np.int64)
    elif col.null_count == 0 and len(col) and pc.all(pc.equal(col, col[0])).as_py():
        return np.zeros(len(col), np.int64), 1  # run, checkpoint, phase: usually one value per frame
    else:
        enc = pc.dictionary_encode(col)
        enc = enc.combine_chunks() if isinstance(enc, pa.ChunkedArray) else enc
        n = len(enc.dictionary)
        return np.asarray(pc.fill_null(enc.indices, n).to_numpy(zero_copy_only=False), np.int64), n + 1
    if not len(v):
        return v, 1
    lo, hi = int(v.min()), int(v.max())
    if hi - lo < (1 << 24):
        return v - lo, hi - lo + 1
    uniq, inv = np.unique(v, return_inverse=True)
    return inv.astype(np.int64), len(uniq)


def _combine(parts: list[tuple[np.ndarray, int]], *, compact: bool = True) -> tuple[np.ndarray, int]:
    """Mixed-radix code of several code columns (first is most significant); order is kept."""
    parts = [p for p in parts if p[1] > 1] or [parts[0]]  # a constant column adds nothing
    code, size = parts[0]
    for c, n in parts[1:]:
        if size * n >= _MAX_CODE:
            code, size = _compact(code, size)
        code, size = code * n + c, size * n
    return _compact(code, size) if compact else (code, size)


def _compact(code: np.ndarray, size: int) -> tuple[np.ndarray, int]:
    if size <= max(8 * len(code), 1 << 22):  # a bincount over that many slots is cheaper than a sort
        present = np.bincount(code, minlength=size) > 0
        remap = np.cumsum(present) - 1
        return remap[code], int(present.sum())
    uniq, inv = np.unique(code, return_inverse=True)
    return inv.astype(np.int64), len(uniq)


def _rows(table: pa.Table, groups: np.ndarray, n_groups: int, columns: dict) -> pa.Table:
    """One row per group: the key columns of any of its rows, then `columns`."""
    any_row = np.empty(n_groups, np.int64)
    any_row[groups] = np.arange(len(groups))  # every row of a group holds the same key
    out = table.take(any_row)
    for name, values in columns.items():
        out = out.append_column(name, pa.array(values))
    return out


def _finish(name: str, table: pa.Table) -> pa.Table:
    schema = ROLLUPS[name]
    return table.select(schema.names).cast(schema)


def _key(table: pa.Table) -> list[tuple[np.ndarray, int]]:
    return [_codes(table.column(c)) for c in KEY]


def token_rollups(stats: pa.Table) -> dict[str, pa.Table]:
    g, G = _combine(_key(stats))
    keyed = stats.select(list(KEY))
    entropy = np.asarray(stats.column("entropy").to_numpy(zero_copy_only=False), np.float64)
    margin = np.asarray(stats.column("margin").to_numpy(zero_copy_only=False), np.float64)
    lse = np.asarray(pc.fill_null(stats.column("logsumexp"), np.nan).to_numpy(zero_copy_only=False), np.float64)
    z_ok = np.isfinite(lse)
    z = lse * lse
    z_tokens = np.bincount(g[z_ok], minlength=G)
    z_sum = np.bincount(g[z_ok], weights=z[z_ok], minlength=G)
    cols = {"tokens": np.bincount(g, minlength=G), "entropy_sum": np.bincount(g, weights=entropy, minlength=G),
            "margin_sum": np.bincount(g, weights=margin, minlength=G), "z_tokens": z_tokens,
            "z_sum": pa.array(z_sum, mask=z_tokens == 0)}  # SQL: a sum over no tokens is NULL
    for stat, x in zip(SKETCH_STATS, (entropy, margin, z)):
        ok = np.isfinite(x)
        qs = group_quantiles(g[ok], G, x[ok], ROLLUP_QUANTILES)
        cols.update({f"{stat}_p{round(q * 100):02d}": pa.array(qs[:, j], mask=np.isnan(qs[:, j]))
                     for j, q in enumerate(ROLLUP_QUANTILES)})
    step = _rows(keyed, g, G, cols)
    hists = []
    for stat, x in zip(SKETCH_STATS, (entropy, margin, z)):
        ok = np.isfinite(x)
        if not ok.any():
            continue
        gb, GB = _combine([(g[ok], G), _codes(sketch_bins(x[ok]))])
        rows = _rows(keyed.filter(pa.array(ok)), gb, GB, {"tokens": np.bincount(gb, minlength=GB)})
        any_row = np.empty(GB, np.int64)
        any_row[gb] = np.arange(len(gb))
        rows = rows.append_column("stat", pa.array([stat] * GB)).append_column(
            "bin", pa.array(sketch_bins(x[ok])[any_row].astype(np.int16)))
        hists.append(_finish("token_hist", rows))
    return {"token_step": _finish("token_step", step), "token_hist": pa.concat_tables(hists)}


def routing_rollups(routing: pa.Table) -> dict[str, pa.Table]:
    key = _key(routing)
    g, G = _combine(key)
    keyed = routing.select(list(KEY))
    expert = np.asarray(routing.column("expert").to_numpy(zero_copy_only=False), np.int64)
    slot = np.asarray(routing.column("slot").to_numpy(zero_copy_only=False), np.int64)
    out = {"domain_step": _domain_step(routing, keyed, g, G, expert, slot)}

    # Rows of one token together, slots in order, tokens in position order within a sequence.
    # Phase is not part of a token's identity: a sequence's adjacent positions pair across phases.
    seqs, _ = _combine(key[:5] + [_codes(routing.column(c)) for c in ("microbatch", "seq")], compact=False)
    pos_raw = np.asarray(routing.column("pos").to_numpy(zero_copy_only=False), np.int64)
    pos, P = _codes(pos_raw)
    tok, _ = _combine([_compact(seqs, int(seqs.max()) + 1), (pos, P)], compact=False)
    s_code, S = _codes(slot)
    order = None
    if tok.size > 1 and (int(tok.max()) + 1) * S < _MAX_CODE:
        row_key = tok * S + s_code
        if np.any(row_key[1:] < row_key[:-1]):
            order = np.argsort(row_key, kind="stable")
    elif tok.size > 1:
        order = np.lexsort((s_code, tok))
    if order is not None:
        tok, g, expert, pos_raw, seqs = tok[order], g[order], expert[order], pos_raw[order], seqs[order]
        keyed = keyed.take(order)
    start = np.ones(len(tok), bool)
    start[1:] = tok[1:] != tok[:-1]
    tid = np.cumsum(start) - 1
    first = np.flatnonzero(start)
    T = len(first)
    width = int(np.diff(np.append(first, len(tok))).max())
    out["coact_step"] = _coact_step(keyed, g, G, expert, tid, width)
    out["repeat_step"] = _repeat_step(keyed, g, G, expert, tid, first, T, width, seqs, pos_raw)
    return out


def _domain_step(routing, keyed, g, G, expert, slot) -> pa.Table:
    has = np.asarray(routing.column("domain").is_valid().to_numpy(zero_copy_only=False), bool)
    if not has.any():
        return ROLLUPS["domain_step"].empty_table()
    dom = routing.column("domain").filter(pa.array(has))
    gd, GD = _combine([(g[has], G), _codes(dom), _codes(expert[has])])
    rows = _rows(keyed.filter(pa.array(has)).append_column("domain", dom).append_column(
        "expert", pa.array(expert[has].astype(np.int16))), gd, GD, {
        "routed": np.bincount(gd, minlength=GD), "top1": np.bincount(gd, weights=slot[has] == 0, minlength=GD).astype(np.int64)})
    return _finish("domain_step", rows)


def _coact_step(keyed, g, G, expert, tid, width) -> pa.Table:
    # Ordered pairs of one token's rows: (i, i) for each row, then both orders of each pair d rows apart.
    gs, ii, jj = [g], [expert], [expert]
    for d in range(1, width):
        same = tid[:-d] == tid[d:]
        a, b, gg = expert[:-d][same], expert[d:][same], g[:-d][same]
        gs += [gg, gg]
        ii += [a, b]
        jj += [b, a]
    gs, ii, jj = np.concatenate(gs), np.concatenate(ii), np.concatenate(jj)
    src = np.concatenate([np.arange(len(g))] + [np.flatnonzero(tid[:-d] == tid[d:]) for d in range(1, width)
                                                for _ in (0, 1)])
    gp, GP = _combine([(gs, G), _codes(ii), _codes(jj)])
    any_row = np.empty(GP, np.int64)
    any_row[gp] = np.arange(len(gp))
    rows = keyed.take(src[any_row]).append_column("expert_i", pa.array(ii[any_row].astype(np.int16))).append_column(
        "expert_j", pa.array(jj[any_row].astype(np.int16))).append_column("together", pa.array(np.bincount(gp, minlength=GP)))
    return _finish("coact_step", rows)


def _repeat_step(keyed, g, G, expert, tid, first, T, width, seqs, pos) -> pa.Table:
    ex = np.full((T, width), -1, np.int64)  # a token's experts by slot order; -1 where it has fewer
    ex[tid, np.arange(len(tid)) - first[tid]] = expert
    t_seq, t_pos, t_g = seqs[first], pos[first], g[first]
    adj = (t_seq[1:] == t_seq[:-1]) & (t_pos[1:] == t_pos[:-1] + 1)
    if not adj.any():
        return ROLLUPS["repeat_step"].empty_table()
    cur, prev = ex[1:][adj], ex[:-1][adj]
    top1 = cur[:, 0] == prev[:, 0]
    overlap = np.zeros(len(cur), bool)
    for a in range(width):
        for b in range(width):
            overlap |= (cur[:, a] == prev[:, b]) & (cur[:, a] >= 0)
    gg = t_g[1:][adj]
    rows_of = first[1:][adj]
    gr, GR = _compact(gg, G)
    any_row = np.empty(GR, np.int64)
    any_row[gr] = rows_of
    rows = keyed.take(any_row).append_column("pairs", pa.array(np.bincount(gr, minlength=GR))).append_column(
        "top1_repeat", pa.array(np.bincount(gr, weights=top1, minlength=GR).astype(np.int64))).append_column(
        "topk_overlap", pa.array(np.bincount(gr, weights=overlap, minlength=GR).astype(np.int64)))
    return _finish("repeat_step", rows)


def rollups(tables: dict[str, pa.Table]) -> dict[str, pa.Table]:
    """The rollup tables of one frame's tables (only those whose source table has rows)."""
    out: dict[str, pa.Table] = {}
    stats, routing = tables.get("token_stats"), tables.get("routing")
    if stats is not None and stats.num_rows:
        out.update(token_rollups(stats))
    if routing is not None and routing.num_rows:
        out.update(routing_rollups(routing))
    return out
