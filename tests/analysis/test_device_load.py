"""Per-device load on hand-built loads: tokens, balancedness and overload equal the hand computation.

Run "ep": layers 0 and 1, 4 experts, 2 devices, 2 ranks. Recorded map: layer 0 [0, 0, 1, 1],
layer 1 [0, 1, [0, 1], 1] (expert 2 replicated on both devices, its load split evenly).
Loads per expert (both ranks summed):
  step 0: layer 0 [4, 2, 1, 1] -> devices (6, 2): balancedness 4/6, overload 1.5
          layer 1 [1, 1, 4, 2] -> devices (1+2, 1+2+2) = (3, 5): 4/5, 1.25
  step 1: layer 0 [3, 3, 1, 1] -> (6, 2): 2/3, 1.5
          layer 1 [0, 3, 2, 3] -> (1, 7): 4/7, 1.75
"""
from __future__ import annotations

import pyarrow as pa
import pytest

from moescope.analysis import compute_metric
from moescope.analysis.store import AnalysisStore as Store
from moescope.frame import Frame
from moescope.schema import EXPERT_STEP, ROUTING

from .whatif_traces import top1_trace, write_trace

E = 4
MAP = {"source": "given", "num_devices": 2, "layers": {"0": [0, 0, 1, 1], "1": [0, 1, [0, 1], 1]}}
LOADS = {  # (step, layer) -> per rank, per expert
    (0, 0): ([2, 1, 1, 0], [2, 1, 0, 1]), (0, 1): ([1, 1, 2, 1], [0, 0, 2, 1]),
    (1, 0): ([3, 3, 1, 1], [0, 0, 0, 0]), (1, 1): ([0, 3, 2, 3], [0, 0, 0, 0]),
}


def config_frame(run: str, run_config: dict) -> Frame:
    """What attach() sends first: the run's config (here with no rows)."""
    return Frame(run=run, producer=f"{run}-config", seq=0, tables={}, meta={"run_config": run_config}, final=True)


def write_loads(store, run: str, run_config: dict | None = MAP) -> None:
    if run_config is not None:
        assert store.write_frame(config_frame(run, {"expert_devices": run_config}))
    for rank in (0, 1):
        rows = [dict(run=run, checkpoint="c0", step=step, rank=rank, layer=layer, expert=x, num_tokens=sum(per[rank]) // 1,
                     tokens=per[rank][x], dropped=0, top1=per[rank][x], prob_sum=0.0, weight_sum=0.0, phase="train")
                for (step, layer), per in LOADS.items() for x in range(E)]
        meta = {"layers": [{"layer": layer, "module_path": f"layers.{layer}.mlp", "num_experts": E, "top_k": 1,
                            "router_kind": "softmax-topk", "capacity_factor": None} for layer in (0, 1)]}
        tables = {"routing": ROUTING.empty_table(), "expert_step": pa.Table.from_pylist(rows, schema=EXPERT_STEP)}
        assert store.write_frame(Frame(run=run, producer=f"{run}-r{rank}", seq=0, tables=tables, meta=meta, final=True))


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "store")
    write_loads(s, "ep")
    yield s
    s.close()


def per_device(df, *keys):
    return {tuple(int(getattr(r, k)) for k in keys): r.tokens for r in df.itertuples()}


def test_tokens_per_device_and_step_follow_the_recorded_map_and_split_replicas(store):
    df = compute_metric(store, "device_load", "ep")
    assert list(df.columns) == ["step", "layer", "device", "tokens", "balancedness", "overload"]
    assert per_device(df, "step", "layer", "device") == {
        (0, 0, 0): 6, (0, 0, 1): 2, (0, 1, 0): 3, (0, 1, 1): 5,
        (1, 0, 0): 6, (1, 0, 1): 2, (1, 1, 0): 1, (1, 1, 1): 7}
    first = df.drop_duplicates(["step", "layer"]).set_index(["step", "layer"])
    assert first.balancedness.to_dict() == pytest.approx({(0, 0): 4 / 6, (0, 1): 4 / 5, (1, 0): 4 / 6, (1, 1): 4 / 7})
    assert first.overload.to_dict() == pytest.approx({(0, 0): 1.5, (0, 1): 1.25, (1, 0): 1.5, (1, 1): 1.75})


def test_all_layers_together_wait_for_each_layers_busiest_device(store):
    df = compute_metric(store, "device_load", "ep", combine_layers=True)
    assert list(df.columns) == ["step", "device", "tokens", "balancedness", "overload"]
    assert per_device(df, "step", "device") == {(0, 0): 9, (0, 1): 7, (1, 0): 7, (1, 1): 9}
    # vLLM's figure: Σ_layers mean / Σ_layers max.
    assert df.groupby("step").balancedness.first().tolist() == pytest.approx([8 / 11, 8 / 13])
    assert df.groupby("step").overload.first().tolist() == pytest.approx([11 / 8, 13 / 8])


def test_a_window_sums_tokens_but_still_waits_for_each_steps_busiest_device(store):
    df = compute_metric(store, "device_load", "ep", by="window")
    assert per_device(df, "layer", "device") == {(0, 0): 12, (0, 1): 4, (1, 0): 4, (1, 1): 12}
    layer1 = df[df.layer == 1].iloc[0]
    assert (layer1.steps, layer1.balancedness, layer1.overload, layer1.overload_max) == pytest.approx((2, 8 / 12, 1.5, 1.75))
    both = compute_metric(store, "device_load", "ep", by="window", combine_layers=True)
    # 16 tokens on each device over the window, yet every step waited for a busier device.
    assert both.tokens.tolist() == [16, 16]
    assert (both.balancedness[0], both.overload[0], both.overload_max[0]) == pytest.approx((16 / 24, 1.5, 13 / 8))


def test_scope_layers_steps_and_ranks_select_rows(store):
    df = compute_metric(store, "device_load", "ep", layers=[1], steps=(1, 1))
    assert per_device(df, "step", "layer", "device") == {(1, 1, 0): 1, (1, 1, 1): 7}
    rank1 = compute_metric(store, "device_load", "ep", ranks=[1], steps=(0, 0), layers=[0])
    assert rank1.tokens.tolist() == [3, 1]  # rank 1's [2, 1, 0, 1]


def test_a_map_given_to_the_metric_overrides_the_recorded_one(store):
    four = compute_metric(store, "device_load", "ep", ep_size=4, steps=(0, 0), layers=[0])
    assert four.tokens.tolist() == [4, 2, 1, 1] and four.balancedness.iloc[0] == pytest.approx(2 / 4)
    spread = compute_metric(store, "device_load", "ep", expert_devices=[0, 1, 0, 1], steps=(0, 0), layers=[0])
    assert spread.tokens.tolist() == [5, 3]
    per_layer = compute_metric(store, "device_load", "ep", expert_devices={0: [1, 1, 1, 0], 1: [0, 0, 0, 0]}, steps=(0, 0))
    # Devices are those of every layer: layer 1 leaves device 1 idle, which counts.
    assert per_device(per_layer, "layer", "device") == {(0, 0): 1, (0, 1): 7, (1, 0): 8, (1, 1): 0}
    assert per_layer[per_layer.layer == 1].balancedness.iloc[0] == pytest.approx(0.5)


def test_a_run_without_a_map_needs_one_given(store):
    write_loads(store, "plain", run_config=None)
    with pytest.raises(ValueError, match="recorded no expert -> device map; pass expert_devices="):
        compute_metric(store, "device_load", "plain")
    assert compute_metric(store, "device_load", "plain", ep_size=2, steps=(0, 0), layers=[0]).tokens.tolist() == [6, 2]


@pytest.mark.parametrize("options, words", [
    (dict(layers=[7]), "has none of layers [7]"),
    (dict(ep_size=3), "ep_size 3 does not divide layer 0's 4 experts"),
    (dict(expert_devices=[0, 1]), "lists 2 experts but the layer has 4"),
    (dict(expert_devices={0: [0, 0, 1, 1]}), "has no map for layer(s) [1]"),
    (dict(expert_devices=[0, 0, 1, 1], ep_size=2), "not both"),
    (dict(combine_layers="yes"), "combine_layers must be true or false"),
    (dict(devices=2), "does not take option(s) ['devices']"),
])
def test_bad_options_give_one_line_errors(store, options, words):
    with pytest.raises(ValueError) as err:
        compute_metric(store, "device_load", "ep", **options)
    assert words in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("bad, words", [
    ({"num_devices": 2}, "no 'layers' object"),
    ({"num_devices": 10**9, "layers": {}}, "num_devices"),
    ({"num_devices": 2, "layers": {"0": [0, 0, 5, 1], "1": [0, 0, 1, 1]}}, "names a device >= num_devices"),
    ({"num_devices": 2, "layers": {"x": [0, 0, 1, 1]}}, "layer 'x'"),
    ({"num_devices": 2, "layers": {"0": [0, 0], "1": [0, 0]}}, "lists 2 experts for layer 0, which has 4"),
])
def test_a_malformed_recorded_map_is_named_not_used(store, bad, words):
    write_loads(store, "bad", run_config=bad)
    with pytest.raises(ValueError) as err:
        compute_metric(store, "device_load", "bad")
    assert words in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- the placement what-if
@pytest.fixture
def traced(tmp_path):
    """Top-1 loads [3, 3, 1, 1] each step; the run recorded experts 0, 2 on device 0 and 1, 3 on device 1."""
    s = Store(tmp_path / "traced")
    s.write_frame(config_frame("t", {"expert_devices": {"source": "given", "num_devices": 2,
                                                        "layers": {"0": [0, 1, 0, 1]}}}))
    write_trace(s, "t", top1_trace([3, 3, 1, 1], [0, 1, 2]), num_experts=E, top_k=1)
    yield s
    s.close()


def test_placement_compares_against_the_recorded_map_and_replays_it_by_default(traced):
    window = compute_metric(traced, "placement", "t", by="window", policy=["contiguous", "recorded"])
    assert set(window.current) == {"recorded"} and set(window.ep_size) == {2}  # not 4, the default without a map
    by_policy = window.set_index("policy")
    assert by_policy.balancedness.to_dict() == pytest.approx({"contiguous": 4 / 6, "recorded": 1.0})
    assert by_policy.improvement["contiguous"] == pytest.approx(4 / 6)
    assert by_policy.placement["recorded"] == [[0, 2], [1, 3]]
    default = compute_metric(traced, "placement", "t", by="step")
    assert set(default.policy) == {"recorded"}
    load = compute_metric(traced, "device_load", "t")
    assert default.tokens.tolist() == load.tokens.tolist() == [4, 4] * 3
    assert default.balancedness.tolist() == pytest.approx(load.balancedness.tolist())


def test_placement_without_the_recorded_map_compares_against_contiguous(traced):
    ignored = compute_metric(traced, "placement", "t", by="window", policy="contiguous", recorded_map=False)
    assert set(ignored.current) == {"contiguous"} and set(ignored.ep_size) == {4}
    other_size = compute_metric(traced, "placement", "t", by="window", policy="contiguous", ep_size=4)
    assert set(other_size.current) == {"contiguous"}
    with pytest.raises(ValueError, match="policy 'recorded' needs the expert -> device map"):
        compute_metric(traced, "placement", "t", policy="recorded", ep_size=4)
    assert "recorded" in set(compute_metric(traced, "placement", "t", by="window", policy="all").policy)
