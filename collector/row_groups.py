"""How a segment's rows are cut into Parquet row groups: by layer, so a one-layer read skips the rest.

Almost every page and what-if reads one layer. When a row group holds every layer, a
reader decodes every row to keep a few; when each row group holds one layer (or a few
adjacent ones), the layer's min/max statistics in the footer let DuckDB and pyarrow skip
the others whole. Rows keep their order within a layer, so a segment's rows of one layer
stay in token order.

Frames arrive as runs of one layer (the probe's rows come per layer call): a run of rows
is moved whole, by slicing, and only a table of many short runs is sorted.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

# A row group closes at a layer boundary once it holds this many rows: small layers share
# one, and no row group is so small that its footer entry costs more than the skip saves.
MIN_GROUP_ROWS = 64_000
# Above this many layer runs, slicing costs more than one stable sort of the rows.
MAX_RUNS = 1024


def by_layer(table: pa.Table, min_rows: int = MIN_GROUP_ROWS) -> list[pa.Table]:
    """`table`'s rows as row groups in layer order, each whole layers of at least `min_rows` rows (the last may be
    smaller); one group when the table has no layer column or fewer than twice `min_rows` rows."""
    if "layer" not in table.column_names or table.num_rows < 2 * min_rows:
        return [table]
    layer = np.asarray(table.column("layer").to_numpy())
    starts = np.r_[0, np.flatnonzero(layer[1:] != layer[:-1]) + 1]
    if len(starts) > MAX_RUNS:
        order = np.argsort(layer, kind="stable")
        table, layer = table.take(order), layer[order]
        starts = np.r_[0, np.flatnonzero(layer[1:] != layer[:-1]) + 1]
    ends = np.r_[starts[1:], len(layer)]
    run_layer = layer[starts]
    runs = np.argsort(run_layer, kind="stable")  # runs of each layer together, in their order
    groups: list[pa.Table] = []
    pending: list[pa.Table] = []
    rows = 0
    for i, r in enumerate(runs):
        pending.append(table.slice(int(starts[r]), int(ends[r] - starts[r])))
        rows += int(ends[r] - starts[r])
        layer_ends = i + 1 == len(runs) or run_layer[runs[i + 1]] != run_layer[r]
        if layer_ends and rows >= min_rows:
            groups.append(_joined(pending))
            pending, rows = [], 0
    if pending:
        groups.append(_joined(pending))
    return groups


def _joined(pieces: list[pa.Table]) -> pa.Table:
    return pieces[0] if len(pieces) == 1 else pa.concat_tables(pieces)
