"""Figure builders: axes with units, integer steps, bucketing, and a message instead of an empty frame."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from moescope.dashboard import figures


def test_ema_matches_tensorboards_debiased_smoothing():
    x = np.array([1.0, 2.0, 3.0, np.nan, 5.0])
    w = 0.6
    want, last, n = [], 0.0, 0
    for v in x:
        if np.isnan(v):
            want.append(np.nan)
            continue
        last, n = last * w + (1 - w) * v, n + 1
        want.append(last / (1 - w ** n))
    got = figures.ema(x, w)
    assert got[0] == 1.0  # debiased: the first point is the first value, not (1 − w)·x
    assert np.allclose(got, want, equal_nan=True)
    assert np.array_equal(figures.ema(x, 0.0), x, equal_nan=True)


def test_empty_frames_say_no_data_for_this_scope():
    empty = pd.DataFrame(columns=["step", "layer", "value"])
    for fig in (figures.step_lines({"r": empty}, "value", title="t", y_title="y"),
                figures.step_heatmap(empty, "value", "layer", title="t", row_title="layer", colour_title="v"),
                figures.band_chart(pd.DataFrame(columns=["step", "mean", "p05", "p95"]), title="t", y_title="y"),
                figures.matrix_heatmap(pd.DataFrame(), title="t", x_title="x", y_title="y", colour_title="c")):
        assert len(fig.data) == 0 and fig.layout.annotations[0].text == figures.NO_DATA


def test_step_lines_label_axes_and_use_whole_step_ticks():
    df = pd.DataFrame({"step": [0, 1, 2], "value": [0.5, 0.4, 0.3]})
    fig = figures.step_lines({"run-a": df}, "value", title="MaxVio", y_title="MaxVio (×)", smoothing=0.5)
    assert fig.layout.xaxis.title.text == "step" and fig.layout.yaxis.title.text == "MaxVio (×)"
    assert fig.layout.xaxis.tickformat == "d" and fig.layout.xaxis.dtick == 1
    raw, smooth = fig.data  # the raw points stay visible behind the smoothed line
    assert list(raw.y) == [0.5, 0.4, 0.3] and list(smooth.y) == pytest.approx(figures.ema([0.5, 0.4, 0.3], 0.5))


def test_long_step_ranges_are_bucketed_to_a_drawable_width():
    steps, layers = 100_000, 64
    df = pd.DataFrame({"step": np.repeat(np.arange(0, steps, 50), layers),
                       "layer": np.tile(np.arange(layers), steps // 50), "maxvio": 1.0})
    fig = figures.step_heatmap(df, "maxvio", "layer", title="MaxVio", row_title="layer", colour_title="MaxVio")
    z = np.asarray(fig.data[0].z)
    assert z.shape[0] == layers and z.shape[1] <= figures.MAX_COLUMNS and np.allclose(z, 1.0)
    assert "buckets" in fig.layout.title.text


def test_fixed_colour_scale_pins_the_range():
    df = pd.DataFrame({"step": [0, 0], "expert": [0, 1], "utilisation": [0.2, 1.8]})
    fixed = figures.step_heatmap(df, "utilisation", "expert", title="t", row_title="expert", colour_title="u",
                                 zrange=figures.FIXED_UTILISATION_RANGE)
    free = figures.step_heatmap(df, "utilisation", "expert", title="t", row_title="expert", colour_title="u")
    assert (fixed.data[0].zmin, fixed.data[0].zmax) == figures.FIXED_UTILISATION_RANGE
    assert free.data[0].zmin is None and free.data[0].zmax is None


def test_over_uniform_scale_is_one_range_for_every_grid_with_white_at_one():
    a = pd.DataFrame([[0.0, 1.0, 3.0]])
    b = pd.DataFrame([[0.5, 6.0, float("nan")]])
    scale = figures.over_uniform_scale(a, b, None)
    assert scale["zrange"] == (0.0, 6.0)
    assert scale["colorscale"][1] == [1 / 6, "#f7f7f7"]
    assert figures.over_uniform_scale(pd.DataFrame([[0.5, 1.2]]))["zrange"] == (0.0, 2.0)  # white stays inside


def test_long_titles_break_onto_a_second_line_at_a_separator():
    long = "Routing agreement: demo-20261203-095941@step-0 vs demo-20261203-095941@step-60"
    assert figures.fit_title(long) == "Routing agreement: demo-20261203-095941@step-0 vs<br>demo-20261203-095941@step-60"
    assert figures.fit_title("Device balancedness (mean / max tokens per device) — all layers") == \
        "Device balancedness (mean / max tokens per device) —<br>all layers"
    assert figures.fit_title("MaxVio per step — layer 0") == "MaxVio per step — layer 0"  # short: as it is
    assert figures.fit_title("x" * 80) == "x" * 80  # nowhere to break
    fig = figures.empty_figure(title=long)
    assert all(len(line) <= figures.TITLE_CHARS for line in fig.layout.title.text.split("<br>"))
