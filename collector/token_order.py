"""Whether a routing segment's rows are in token order, checked as it is written and recorded in its footer.

The cache what-if replays each (layer, rank) stream in token order (step, checkpoint,
microbatch, seq, pos, slot). The probe writes rows so and row groups keep that order
within a layer (row_groups.by_layer), but a reader could confirm it only by reading every
ordering column: twice the columns of the replay itself. The writer holds the rows
anyway, so it checks and records the answer as footer key-value metadata. The record says
more than the order: the segment holds one rank and one checkpoint, so a reader that sees
segments of one rank with disjoint step ranges knows their rows need no sort.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

KEY = "moescope.token_order"
VALUE = "layer,rank,step,checkpoint,microbatch,seq,pos,slot"
# Within a layer, rows must never go back in these, most significant first (rank and checkpoint: one value).
_WITHIN = ("step", "microbatch", "seq", "pos", "slot")


class TokenOrder:
    """Fed a segment's row groups as they are written: `metadata()` records the order when it held throughout."""

    def __init__(self, schema: pa.Schema):
        self.ordered = all(name in schema.names for name in ("layer", "rank", "checkpoint", *_WITHIN))
        self.last: dict[int, tuple] = {}  # layer -> its last row's (step, microbatch, seq, pos, slot)
        self.rank: object = None
        self.checkpoint: object = None
        self.rows = 0

    def feed(self, group: pa.Table) -> None:
        if not self.ordered or not group.num_rows:
            return
        self.ordered = self._single(group, "rank") and self._single(group, "checkpoint") and self._in_order(group)
        self.rows += group.num_rows

    def metadata(self) -> dict[str, str]:
        return {KEY: VALUE} if self.ordered and self.rows else {}

    def _single(self, group: pa.Table, name: str) -> bool:
        value = _one_value(group.column(name))
        if value is _MANY or (self.rows and value != getattr(self, name)):
            return False
        setattr(self, name, value)
        return True

    def _in_order(self, group: pa.Table) -> bool:
        if any(group.column(c).null_count for c in ("layer", *_WITHIN)):
            return False
        layer = group.column("layer").to_numpy()
        cols = [group.column(c).to_numpy() for c in _WITHIN]
        key = _packed(cols)
        if key is None:
            return False
        # Within a run of one layer the key never goes back; each run continues where that layer's previous run
        # (this group's or an earlier one's) ended. The probe sends a frame as runs of one layer per forward.
        change = np.flatnonzero(layer[1:] != layer[:-1])
        back = np.flatnonzero(key[1:] < key[:-1])
        if len(back) and not np.isin(back, change).all():
            return False
        for s, e in zip(np.r_[0, change + 1].tolist(), np.r_[change, len(layer) - 1].tolist()):
            seen = self.last.get(int(layer[s]))
            if seen is not None and tuple(int(c[s]) for c in cols) < seen:
                return False
            self.last[int(layer[s])] = tuple(int(c[e]) for c in cols)
        return True


_MANY = object()


def _one_value(col: pa.ChunkedArray):
    """The column's one value (None when all null), or _MANY. One-value dictionaries (a worker's frames) and
    integers cost next to nothing; plain strings (imports) are hashed."""
    if pa.types.is_integer(col.type):
        if col.null_count:
            return None if col.null_count == len(col) else _MANY
        values = col.to_numpy()
        return int(values[0]) if values.min() == values.max() else _MANY
    seen = set()
    for chunk in col.chunks:
        if chunk.null_count == len(chunk):
            seen.add(None)
        elif isinstance(chunk, pa.DictionaryArray) and len(chunk.dictionary) == 1 and not chunk.null_count:
            seen.add(chunk.dictionary[0].as_py())
        else:
            seen.update(pc.unique(chunk).to_pylist())
        if len(seen) > 1:
            return _MANY
    return next(iter(seen), None)


def _packed(cols: list[np.ndarray]) -> np.ndarray | None:
    """(step, microbatch, seq, pos, slot) of each row as one int64 that sorts as they do; None when the ranges need
    more than 63 bits. Built in place: one array the length of the group."""
    lows = [int(c.min()) for c in cols]
    bits = [(int(c.max()) - lo).bit_length() for c, lo in zip(cols, lows)]
    if sum(bits) > 63:
        return None
    key = cols[0].astype(np.int64)
    key -= lows[0]
    for c, lo, b in zip(cols[1:], lows[1:], bits[1:]):
        key <<= b
        key += c
        if lo:
            key -= lo
    return key
