"""The rank filter: compute_metric(..., ranks=[r]) on a multi-rank run equals the metric of a run holding only rank r."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from moescope.analysis import compute_metric
from moescope.analysis.query import make_scope
from synth_runs import E, synth_steps, write_run

LAYERS = {0: (E, 2), 1: (E, 1), 2: (E, 2)}


class _AsRank:
    """Writes every frame as if `rank` had produced it (its own producer name)."""

    def __init__(self, store, rank: int):
        self.store, self.rank = store, rank

    def write_frame(self, frame):
        tables = {name: t.set_column(t.schema.get_field_index("rank"), "rank",
                                     pa.array(np.full(t.num_rows, self.rank, np.int32)))
                  for name, t in frame.tables.items()}
        return self.store.write_frame(dataclasses.replace(frame, tables=tables, producer=f"{frame.producer}-r{self.rank}"))


@pytest.fixture
def ranked(store):
    """Run "both": rank 0 and rank 1 with different routing; run "one": rank 1's frames alone."""
    write_run(_AsRank(store, 0), "both", synth_steps(seed=1), LAYERS)
    write_run(_AsRank(store, 1), "both", synth_steps(seed=2), LAYERS)
    write_run(_AsRank(store, 1), "one", synth_steps(seed=2), LAYERS)
    return store


@pytest.mark.parametrize("name, kw", [
    ("maxvio", {}), ("drop_rate", {"by": "window"}), ("entropy", {}), ("domain_specialisation", {}),
    ("vocab_specialisation", {"min_count": 1}), ("expert_cache", {"cache_sizes": [1, 3]}),
    ("placement", {"ep_size": 2, "policy": ["contiguous", "eplb"]}), ("predicted_drops", {}),
])
def test_a_rank_filter_reads_only_that_ranks_rows(ranked, name, kw):
    got = compute_metric(ranked, name, "both", ranks=[1], **kw)
    want = compute_metric(ranked, name, "one", **kw)
    assert not want.empty
    pd.testing.assert_frame_equal(got, want, check_dtype=False)
    every = compute_metric(ranked, name, "both", **kw)
    assert not every.equals(got)  # without the filter both ranks count
    assert compute_metric(ranked, name, "both", ranks=[0, 1], **kw).equals(every)


def test_ranks_are_checked_like_layers():
    assert make_scope("r", ranks=3).ranks == (3,)
    assert make_scope("r", ranks=[2, 0, 2]).ranks == (0, 2)
    for bad in ("0", [0.5], [True]):
        with pytest.raises(ValueError, match="ranks must be a list of ints"):
            make_scope("r", ranks=bad)
    where, _ = make_scope("r", ranks=[]).where()
    assert where.endswith("FALSE")
