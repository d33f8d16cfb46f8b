"""The expert -> device map: given at attach time or read from the adapter, recorded with the run, checked."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_moe import FakeAdapter, FakeLM, batch, fake_sites  # noqa: E402

from moescope.collector.store import Store  # noqa: E402
from moescope.probe import attach  # noqa: E402


def recorded_config(model, **options) -> dict:
    ids, mask = batch()
    with attach(model, sink="memory", run="r", sites=options.pop("sites", None) or fake_sites(model), **options) as probe:
        model(ids, attention_mask=mask)
    return probe.sink.frames[0].meta["run_config"]


def test_a_list_applies_to_every_layer_and_lists_replicas(tmp_path):
    model = FakeLM(e=4, layers=2)
    ids, mask = batch()
    with attach(model, sink=f"local:{tmp_path / 'store'}", run="ep", sites=fake_sites(model),
                expert_devices=[0, 0, 1, [1, 2]]):
        model(ids, attention_mask=mask)
    store = Store(tmp_path / "store")
    try:
        assert store.run_config("ep")["expert_devices"] == {
            "source": "given", "num_devices": 3, "layers": {"0": [0, 0, 1, [1, 2]], "1": [0, 0, 1, [1, 2]]}}
    finally:
        store.close()


def test_a_dict_maps_each_layer_and_layers_not_watched_are_left_out():
    model = FakeLM(e=4, layers=3)
    maps = {0: [0, 1, 0, 1], 1: [1, 1, 0, 0], 2: [0, 0, 0, 1]}
    config = recorded_config(model, expert_devices=maps, watch=[0, 2])
    assert config["expert_devices"]["layers"] == {"0": [0, 1, 0, 1], "2": [0, 0, 0, 1]}
    assert config["expert_devices"]["num_devices"] == 2


def test_ep_size_places_experts_contiguously():
    config = recorded_config(FakeLM(e=4, layers=2), ep_size=2)
    assert config["expert_devices"] == {"source": "ep_size", "num_devices": 2,
                                        "layers": {"0": [0, 0, 1, 1], "1": [0, 0, 1, 1]}}


def test_no_map_given_and_none_known_records_none():
    config = recorded_config(FakeLM())
    assert "expert_devices" not in config and config["probe"]["adapters"] == ["fake"]


@pytest.mark.parametrize("options, words", [
    (dict(ep_size=3), "ep_size 3 does not divide layer 0's 4 experts"),
    (dict(ep_size=0), "ep_size must be an int >= 1"),
    (dict(expert_devices=[0, 1]), "lists 2 experts but the layer has 4"),
    (dict(expert_devices=[0, 0, 1, -1]), "puts expert 3 on -1"),
    (dict(expert_devices=[0, 0, 1, []]), "puts expert 3 on []"),
    (dict(expert_devices=[0, 0, 1, "x"]), "puts expert 3 on 'x'"),
    (dict(expert_devices={0: [0, 0, 1, 1]}), "has no map for layer(s) [1]"),
    (dict(expert_devices={"first": [0, 0, 1, 1]}), "keys must be layer ints"),
    (dict(expert_devices="0,0,1,1"), "must list one device per expert"),
    (dict(expert_devices=[0, 0, 1, 1], ep_size=2), "not both"),
])
def test_bad_maps_give_one_line_errors_and_leave_no_hooks(options, words):
    model = FakeLM(e=4, layers=2)
    with pytest.raises(ValueError) as err:
        attach(model, sink="memory", run="r", sites=fake_sites(model), **options)
    assert words in str(err.value) and "\n" not in str(err.value)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


class ParallelAdapter(FakeAdapter):
    """An adapter that knows where experts live, as the Megatron-Core and DeepSpeed adapters do."""

    def __init__(self, devices):
        self.devices = devices

    def expert_devices(self, model, site):
        if isinstance(self.devices, Exception):
            raise self.devices
        return self.devices


def test_the_adapter_says_where_experts_live_when_no_map_is_given():
    model = FakeLM(e=4, layers=2)
    config = recorded_config(model, sites=fake_sites(model, ParallelAdapter([0, 0, 1, 1])))
    assert config["expert_devices"] == {"source": "fake", "num_devices": 2,
                                        "layers": {"0": [0, 0, 1, 1], "1": [0, 0, 1, 1]}}
    given = recorded_config(model, sites=fake_sites(model, ParallelAdapter([0, 0, 1, 1])), expert_devices=[0, 1, 0, 1])
    assert given["expert_devices"]["layers"]["0"] == [0, 1, 0, 1]  # what the user says wins


@pytest.mark.parametrize("devices", [RuntimeError("odd group"), [0, 1]])
def test_an_adapter_that_misreads_the_framework_records_no_map_and_attaches(devices, caplog):
    model = FakeLM(e=4, layers=2)
    with caplog.at_level(logging.WARNING, logger="moescope.probe"):
        config = recorded_config(model, sites=fake_sites(model, ParallelAdapter(devices)))
    assert "expert_devices" not in config
    assert any("no device map recorded" in r.getMessage() or "none recorded" in r.getMessage() for r in caplog.records)
