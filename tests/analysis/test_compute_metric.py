"""compute_metric: the registry, argument checks and error messages."""
import pytest

from moescope.analysis import METRICS, compute_metric
from moescope.collector.store import UnknownRun

NAMES = ["load_share", "switch_score", "maxvio", "cv", "utilisation", "dead_experts", "drop_rate", "entropy", "z",
         "margin", "domain_specialisation", "vocab_specialisation", "coactivation", "repetition", "saturation",
         "fluctuation", "load_js", "alignment", "predicted_drops", "placement", "device_load", "expert_cache", "collapse",
         "balance"]  # maxvio, cv, switch_score and drop_rate from one read


def test_registry_holds_every_metric_of_metrics_md_with_a_cited_docstring():
    assert sorted(METRICS) == sorted(NAMES)
    for m in METRICS.values():
        assert m.doc and ("Eq." in m.doc or "§" in m.doc), m.name


def test_unknown_metric_lists_valid_names(synth):
    store, _ = synth
    with pytest.raises(ValueError, match="unknown metric 'maxviolation'; valid metrics: load_share"):
        compute_metric(store, "maxviolation", "synth")


def test_unknown_run_raises_the_stores_unknown_run(synth):
    store, _ = synth
    with pytest.raises(UnknownRun):
        compute_metric(store, "maxvio", "nope")
    with pytest.raises(UnknownRun):
        store.metric("maxvio", run="nope")


@pytest.mark.parametrize("kw, msg", [
    ({"layers": "0"}, "layers must be a list of ints"),
    ({"layers": [0.5]}, "layers must be a list of ints"),
    ({"steps": 5}, "steps must be a"),
    ({"steps": (5, 1)}, "lo <= hi"),
    ({"by": "epoch"}, "by must be one of"),
    ({"threshold": 0.1}, "does not take option"),
])
def test_bad_arguments_raise_one_line_value_errors(synth, kw, msg):
    store, _ = synth
    with pytest.raises(ValueError, match=msg) as info:
        compute_metric(store, "maxvio", "synth", **kw)
    assert "\n" not in str(info.value)


def test_every_metric_runs_through_the_store(synth):
    store, _ = synth
    for name in NAMES:
        if name in ("saturation", "fluctuation", "alignment"):  # compare probe-set replays: see test_drift.py
            with pytest.raises(ValueError, match="run 'synth' has no probe-set replays to compare"):
                store.metric(name, run="synth", layers=[0, 2])
            continue
        if name == "device_load":  # needs where experts live, which synth never recorded: see test_device_load.py
            with pytest.raises(ValueError, match="recorded no expert -> device map"):
                store.metric(name, run="synth", layers=[0, 2])
            continue
        df = store.metric(name, run="synth", layers=[0, 2])
        assert not df.empty, name


def test_layer_sizes_of_a_run_without_metadata_follow_its_new_segments(store):
    """Layer sizes read from the data are kept per segment list: a layer first seen in a new frame appears."""
    import sys
    import uuid
    from pathlib import Path

    import numpy as np
    import pyarrow as pa

    sys.path.insert(0, str(Path(__file__).parent))
    from synth_runs import T, StepData, make_layer_tables, random_layer

    from moescope.analysis.query import layer_meta
    from moescope.frame import Frame

    rng = np.random.default_rng(0)

    def write(seq: int, layer: int):
        s = StepData(step=seq, checkpoint="c0", token_ids_T=rng.integers(0, 6, T))
        tables = make_layer_tables("bare", s, random_layer(layer, rng))
        store.write_frame(Frame(run="bare", producer="p", seq=seq, tables=dict(tables), frame_id=uuid.uuid4().hex, meta={}))

    write(0, 0)
    assert layer_meta(store, "bare").layer.tolist() == [0]
    write(1, 3)
    meta = layer_meta(store, "bare")
    assert meta.layer.tolist() == [0, 3] and meta.E.tolist() == [8, 8] and meta.k.tolist() == [2, 2]
    assert not compute_metric(store, "maxvio", "bare", layers=[3]).empty
