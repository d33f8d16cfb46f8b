"""compute_metric: the registry, argument checks and error messages."""
import pytest

from moescope.analysis import METRICS, compute_metric
from moescope.collector.store import UnknownRun

NAMES = ["load_share", "switch_score", "maxvio", "cv", "utilisation", "dead_experts", "drop_rate", "entropy", "z",
         "margin", "domain_specialisation", "vocab_specialisation", "coactivation", "repetition", "saturation",
         "fluctuation", "load_js", "alignment", "predicted_drops", "placement", "device_load", "expert_cache", "collapse"]


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
