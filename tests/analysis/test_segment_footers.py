"""Segment footers read once per segment: the same facts through pyarrow (a directory) and DuckDB (objects)."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from test_cache_kernels import write_frames  # noqa: E402

from moescope.analysis import segment_footers  # noqa: E402


def test_local_and_object_readers_agree_and_each_footer_is_read_once(store, monkeypatch):
    write_frames(store, "f", np.random.default_rng(1), checkpoints=("a",), shuffle=False)  # token order recorded
    write_frames(store, "f", np.random.default_rng(2), checkpoints=("b",), producer="q")   # rows shuffled: not
    files = store.segment_paths("routing", "f")
    local = segment_footers._local(files)
    assert local == segment_footers._remote(store, "f", files)
    assert all(footer.full() for footer in local.values())
    assert sorted(footer.token_order for footer in local.values()) == [False] * (len(files) // 2) + [True] * (len(files) // 2)
    steps = store.sql("SELECT step FROM routing", run="f").step
    assert min(f.ranges["step"][0] for f in local.values()) == steps.min()
    assert max(f.ranges["step"][1] for f in local.values()) == steps.max()

    segment_footers.KEPT.clear()
    read = []
    monkeypatch.setattr(segment_footers, "_local", lambda todo, _f=segment_footers._local: read.extend(todo) or _f(todo))
    assert segment_footers.footers(store, "f", files) == local
    assert segment_footers.footers(store, "f", files[:3]) == {f: local[f] for f in files[:3]}
    assert sorted(read) == sorted(files)
