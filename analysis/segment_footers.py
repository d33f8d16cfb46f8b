"""What a routing segment's footer says, read once per segment and kept.

The what-ifs plan their reads from footers: each segment's step range (which segments a
window needs, in what order) and, for the cache replay, the ranges of every token-order
column and whether the writer recorded the rows in token order (collector/token_order.py).
A segment never changes under its name (collector.store), so what its footer says is kept
by name; a page that asks again, or another page, reads no footer twice. Local footers are
read by pyarrow (about 0.4 ms each, a third of DuckDB's parquet_metadata over the same
files); objects' through DuckDB, which reads them with the store's filesystem.
"""
from __future__ import annotations

import dataclasses

import pyarrow.parquet as pq

from moescope.analysis.memo import BoundedMemo
from moescope.collector import token_order
from moescope.collector.store import sql_list

# The integer columns whose ranges are kept: a token's place in the replay order.
RANGED = ("rank", "step", "microbatch", "seq", "pos", "slot")


@dataclasses.dataclass(frozen=True)
class Footer:
    ranges: dict[str, tuple[int, int]]  # (min, max) of each RANGED column with statistics in every row group
    token_order: bool                   # the writer recorded its rows in token order

    def full(self) -> bool:
        return len(self.ranges) == len(RANGED)


# Footers by segment path (unique per segment): one entry each.
KEPT = BoundedMemo(1 << 16)


def footers(store, run: str, files: list[str]) -> dict[str, Footer]:
    found = {f: KEPT.get(f) for f in files}
    todo = [f for f, v in found.items() if v is None]
    if todo:
        for f, footer in (_remote(store, run, todo) if store.remote else _local(todo)).items():
            KEPT.put(f, footer, 1)
            found[f] = footer
    return found


def _local(files: list[str]) -> dict[str, Footer]:
    out = {}
    for f in files:
        meta = pq.read_metadata(f)
        names = [meta.schema.column(j).path for j in range(meta.num_columns)]
        ranges = {}
        for col in RANGED:
            if col not in names or not meta.num_row_groups:
                continue
            stats = [meta.row_group(i).column(names.index(col)).statistics for i in range(meta.num_row_groups)]
            if all(st is not None and st.has_min_max for st in stats):
                ranges[col] = (min(int(st.min) for st in stats), max(int(st.max) for st in stats))
        kv = meta.metadata or {}
        out[f] = Footer(ranges, kv.get(token_order.KEY.encode()) == token_order.VALUE.encode())
    return out


def _remote(store, run: str, files: list[str]) -> dict[str, Footer]:
    con = store.connect(run, tables=())
    try:
        names = ", ".join(f"'{c}'" for c in RANGED)
        stats = con.sql(f"""SELECT file_name, path_in_schema, min(TRY_CAST(stats_min_value AS BIGINT)),
                                   max(TRY_CAST(stats_max_value AS BIGINT)), count(*) - count(stats_min_value)
                            FROM parquet_metadata({sql_list(files)}) WHERE path_in_schema IN ({names})
                            GROUP BY ALL""").fetchall()
        flagged = {name for name, key, value in con.sql(
            f"SELECT file_name, key, value FROM parquet_kv_metadata({sql_list(files)})").fetchall()
            if key == token_order.KEY.encode() and value == token_order.VALUE.encode()}
    finally:
        con.close()
    ranges: dict[str, dict] = {f: {} for f in files}
    for name, col, lo, hi, missing in stats:
        if name in ranges and not missing and lo is not None and hi is not None:
            ranges[name][col] = (int(lo), int(hi))
    return {f: Footer(r, f in flagged) for f, r in ranges.items()}
