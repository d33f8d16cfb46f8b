"""Figure builders: shapes and labels from metric frames, and a message instead of an error when empty."""
from __future__ import annotations

import numpy as np
import pandas as pd

from moescope.dashboard import figures


def _share(layers=(0, 3), experts=4, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for layer in layers:
        load_E = rng.integers(0, 50, experts).astype(float)
        for e in range(experts):
            rows.append({"layer": layer, "expert": e, "load": load_E[e], "share": load_E[e] / load_E.sum(),
                         "uniform": 1 / experts})
    return pd.DataFrame(rows)


def test_load_heatmap_has_a_row_per_layer_and_a_column_per_expert():
    share = _share()
    fig = figures.load_heatmap(share, run="r", checkpoint="c1")
    z_LE = np.asarray(fig.data[0].z)
    assert z_LE.shape == (2, 4) and list(fig.data[0].y) == ["layer 0", "layer 3"]
    assert np.allclose(z_LE.ravel(), share.share) and "checkpoint c1" in fig.layout.title.text
    assert fig.layout.uirevision == "r"  # refreshes keep the user's zoom


def test_empty_metric_frames_give_a_message_not_an_error():
    for fig in (figures.load_heatmap(pd.DataFrame(columns=["layer", "expert", "share", "uniform"]), run="r", checkpoint=None),
                figures.maxvio_chart(pd.DataFrame(columns=["step", "layer", "maxvio", "maxvio_mean_layers"]), run="r"),
                figures.entropy_chart(pd.DataFrame(columns=["step", "layer", "mean", "uniform"]), run="r"),
                figures.domain_heatmap(pd.DataFrame(columns=["layer", "domain", "expert", "share", "uniform"]), run="r")):
        assert len(fig.data) == 0 and fig.layout.annotations[0].text.startswith("no ")


def test_entropy_chart_marks_uniform_entropy_per_distinct_layer_size():
    df = pd.DataFrame({"step": [0, 1, 0, 1], "layer": [0, 0, 1, 1], "mean": [1.2, 1.1, 0.9, 0.8],
                       "uniform": [np.log(4)] * 2 + [np.log(8)] * 2})
    fig = figures.entropy_chart(df, run="r")
    assert [t.name for t in fig.data] == ["layer 0", "layer 1"]
    assert sorted(s.y0 for s in fig.layout.shapes) == sorted([np.log(4), np.log(8)])
