"""Placement what-if against hand computations on traces whose loads, homes and optimum are known."""
import itertools
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from whatif_traces import top1_trace, write_trace  # noqa: E402

from moescope.analysis import compute_metric  # noqa: E402
from moescope.analysis import placement as placement_module  # noqa: E402
from moescope.analysis import placement_replay as pr  # noqa: E402
from moescope.cli import main  # noqa: E402

# Eight top-2 tokens over E=8 experts; the token at pos p lives on device p mod 4.
EIGHT = {0: [(0, (0, 1)), (1, (0, 2)), (2, (0, 4)), (3, (0, 6)), (4, (1, 3)), (5, (2, 5)), (6, (4, 7)), (7, (6, 7))]}


@pytest.fixture(autouse=True)
def fresh_counts():
    """Each test reads its routing rows itself: nothing kept from another test."""
    kept = (pr.CACHE, placement_module.PRICED, placement_module.ROLLUP_READS)
    for memo in kept:
        memo.clear()
    yield
    for memo in kept:
        memo.clear()


@pytest.fixture(params=["signatures", "sparse signatures", "rows"])
def replay_path(request, monkeypatch):
    """Every replay: token signatures (the probe's layout) priced densely or entry by entry, and row by row
    (forced by a zero table budget)."""
    if request.param == "rows":
        monkeypatch.setattr(pr, "SIGNATURE_TABLE_MAX", 0)
    if request.param == "sparse signatures":
        monkeypatch.setattr(pr, "DENSE_COUNTS_MAX", 0)
    return request.param


@pytest.fixture
def eight(store, replay_path):
    write_trace(store, "eight", EIGHT, num_experts=8, top_k=2)
    return store


def _devices(df, column):
    return df.sort_values("device")[column].tolist()


def test_contiguous_placement_tokens_balance_and_bytes_equal_hand_computation(eight):
    df = compute_metric(eight, "placement", "eight", ep_size=4, hidden_size=16, dtype="bf16")
    assert set(df.policy) == {"contiguous"} and len(df) == 4
    # devices hold {0,1} {2,3} {4,5} {6,7}: loads 4+2, 2+1, 2+1, 2+2
    assert _devices(df, "tokens") == [6, 3, 3, 4]
    assert df.balancedness.iloc[0] == pytest.approx(4 / 6) and df.overload.iloc[0] == pytest.approx(1.5)
    assert _devices(df, "copies_sent") == [1, 2, 2, 1]
    assert _devices(df, "copies_recv") == [3, 1, 1, 1]
    assert _devices(df, "bytes_sent") == [32, 64, 64, 32]  # 16 values × 2 bytes per copy


def test_round_robin_placement_tokens_balance_and_bytes_equal_hand_computation(eight):
    df = compute_metric(eight, "placement", "eight", ep_size=4, policy="round_robin", hidden_size=4, dtype="float32")
    assert _devices(df, "tokens") == [6, 3, 4, 3]  # {0,4} {1,5} {2,6} {3,7}
    assert df.balancedness.iloc[0] == pytest.approx(4 / 6)
    assert _devices(df, "copies_sent") == [3, 3, 3, 3]
    assert _devices(df, "copies_recv") == [4, 2, 4, 2]
    assert _devices(df, "bytes_recv") == [64, 32, 64, 32]


def test_internode_copies_count_distinct_remote_nodes(eight):
    df = compute_metric(eight, "placement", "eight", ep_size=4, gpus_per_node=2)
    assert _devices(df, "node") == [0, 0, 1, 1]
    assert _devices(df, "copies_sent_internode") == [0, 1, 1, 1]
    assert df.bytes_sent.isna().all()  # no hidden_size: copies only


def test_explicit_map_with_replicas_gives_expected_copies_of_a_uniform_replica_choice(eight):
    expert_map = {0: [0, 2], 1: [0, 3], 2: 1, 3: 1, 4: 2, 5: 2, 6: 3, 7: [3, 1]}
    df = compute_metric(eight, "placement", "eight", ep_size=4, expert_map=expert_map)
    assert set(df.policy) == {"map"}
    devices = {e: (d if isinstance(d, list) else [d]) for e, d in expert_map.items()}
    load = np.bincount([e for _, ex in EIGHT[0] for e in ex], minlength=8)
    tokens = [sum(load[e] / len(ds) for e, ds in devices.items() if d in ds) for d in range(4)]
    assert np.allclose(_devices(df, "tokens"), tokens)
    # Brute force: every combination of replicas, equally likely.
    sent, recv, internode = np.zeros(4), np.zeros(4), np.zeros(4)
    for pos, experts in EIGHT[0]:
        combos = list(itertools.product(*(devices[e] for e in experts)))
        for combo in combos:
            remote = set(combo) - {pos % 4}
            sent[pos % 4] += len(remote) / len(combos)
            internode[pos % 4] += len({d // 2 for d in combo} - {pos % 4 // 2}) / len(combos)
            for d in remote:
                recv[d] += 1 / len(combos)
    assert np.allclose(_devices(df, "copies_sent"), sent)
    assert np.allclose(_devices(df, "copies_recv"), recv)
    two_nodes = compute_metric(eight, "placement", "eight", ep_size=4, gpus_per_node=2, expert_map=expert_map)
    assert np.allclose(_devices(two_nodes, "copies_sent_internode"), internode)


def test_eplb_global_reaches_perfect_balance_where_contiguous_and_round_robin_do_not(store):
    write_trace(store, "skew", top1_trace([8, 7, 6, 5, 4, 3, 2, 1], [0]), num_experts=8, top_k=1)
    df = compute_metric(store, "placement", "skew", ep_size=4, policy=["contiguous", "round_robin", "eplb"])
    bal = df.groupby("policy").balancedness.first()
    assert bal["contiguous"] == pytest.approx(9 / 15)  # 15 11 7 3
    assert bal["round_robin"] == pytest.approx(9 / 12)  # 12 10 8 6
    assert bal["eplb"] == pytest.approx(1.0)  # 8+1, 7+2, 6+3, 5+4


def test_eplb_hierarchical_keeps_expert_groups_on_their_node(store):
    write_trace(store, "skew", top1_trace([8, 7, 6, 5, 4, 3, 2, 1], [0]), num_experts=8, top_k=1)
    df = compute_metric(store, "placement", "skew", ep_size=4, gpus_per_node=2, expert_groups=2, policy="eplb", by="window")
    # group {0..3} (26 tokens) on node 0 as 8+5, 7+6; group {4..7} on node 1 as 4+1, 3+2
    assert df.placement.iloc[0] == [[0, 3], [1, 2], [4, 7], [5, 6]]
    assert df.balancedness.iloc[0] == pytest.approx(9 / 13)
    glob = compute_metric(store, "placement", "skew", ep_size=4, gpus_per_node=2, policy="eplb_global", by="window")
    assert glob.balancedness.iloc[0] == pytest.approx(1.0)


def test_eplb_replicates_the_hot_expert_into_redundant_slots(store):
    write_trace(store, "hot", top1_trace([12, 4, 4, 4], [0]), num_experts=4, top_k=1)
    df = compute_metric(store, "placement", "hot", ep_size=4, redundant_slots=4, policy=["contiguous", "eplb"], by="window")
    eplb = df[df.policy == "eplb"].iloc[0]
    assert sorted(x for d in eplb.placement for x in d) == [0, 0, 0, 0, 1, 1, 2, 3]  # 12/4 = 3 per copy, 4/2 = 2
    assert eplb.balancedness == pytest.approx(1.0)
    cont = df[df.policy == "contiguous"].iloc[0]
    assert cont.placement == [[0, 1], [2, 3], [0, 1], [2, 3]]
    assert cont.balancedness == pytest.approx(6 / 8)


def test_suggestion_fitted_on_past_window_is_judged_on_the_later_one(store):
    trace = top1_trace([8, 7, 6, 5, 4, 3, 2, 1], [0, 1])
    trace.update(top1_trace([1, 1, 1, 1, 1, 1, 1, 9], [2, 3]))
    write_trace(store, "shift", trace, num_experts=8, top_k=1)
    past = compute_metric(store, "placement", "shift", ep_size=4, policy="eplb", by="window", fit_steps=(0, 1), steps=(0, 1))
    assert past.balancedness.iloc[0] == pytest.approx(1.0) and past.fit_eval_gap.iloc[0] == pytest.approx(0.0)
    later = compute_metric(store, "placement", "shift", ep_size=4, policy="eplb", by="window", fit_steps=(0, 1), steps=(2, 3))
    row = later.iloc[0]
    assert row.placement == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert row.balancedness_fit == pytest.approx(1.0)
    assert row.balancedness == pytest.approx(4 / 10)  # later loads: 1+9, 2, 2, 2
    assert row.fit_eval_gap == pytest.approx(1 - 0.4)
    # fitted on the later traffic itself, EPLB can do no better: expert 7 alone holds 9 of 16
    assert row.balancedness_hindsight == pytest.approx(0.4) and row.staleness == pytest.approx(0.0)
    # contiguous gets 2 2 2 10 on the later traffic: the past-fitted map is no better there
    assert row.current == "contiguous" and row.improvement == pytest.approx(1.0)
    assert bool(row.suggested)


def test_no_map_is_suggested_when_none_beats_the_current_placement(store, capsys):
    # Eight experts on eight devices: every placement puts one expert on each, so all balance alike.
    write_trace(store, "flat", top1_trace([8, 7, 6, 5, 4, 3, 2, 1], [0, 1]), num_experts=8, top_k=1)
    df = compute_metric(store, "placement", "flat", ep_size=8, policy=["contiguous", "eplb", "coactivation"], by="window")
    assert df.balancedness.nunique() == 1 and not df.suggested.any()
    assert main(["whatif", "placement", "flat", "--store", str(store.root), "--ep-size", "8", "--policy", "eplb"]) == 0
    assert "layer 0: no map suggested: none balances the fit window better than contiguous" in capsys.readouterr().out
    # Already the balanced map: EPLB's fit cannot gain on it either.
    best = compute_metric(store, "placement", "flat", ep_size=4, policy="eplb", by="window").placement.iloc[0]
    device_of = {e: d for d, experts in enumerate(best) for e in experts}
    again = compute_metric(store, "placement", "flat", ep_size=4, policy=["map", "eplb"],
                           expert_map=[device_of[e] for e in range(8)], by="window")
    assert again.current.iloc[0] == "map" and not again.suggested.any()
    # Two devices short of balance: the suggestion returns.
    assert compute_metric(store, "placement", "flat", ep_size=4, policy=["contiguous", "eplb"], by="window").suggested.any()


def test_suggested_map_reaches_the_optimum_and_cuts_copies_against_contiguous(store):
    # pairs (0,7) (1,6) (2,5) (3,4) always fire together, equal loads: the optimum is balance 1
    # with each pair on one device, one copy per token not living there.
    pairs = [(0, 7), (1, 6), (2, 5), (3, 4)]
    trace = {s: [(4 * q + r, pairs[q]) for q in range(4) for r in range(4)] for s in range(4)}
    write_trace(store, "pairs", trace, num_experts=8, top_k=2)
    df = compute_metric(store, "placement", "pairs", ep_size=4, policy=["contiguous", "eplb", "coactivation"], by="window",
                        fit_steps=(0, 1), steps=(2, 3), hidden_size=8)
    by = df.set_index("policy")
    assert by.loc["contiguous", "copies_per_step"] == 24 and by.loc["eplb", "copies_per_step"] == 24
    best = df[df.suggested]
    assert best.policy.tolist() == ["coactivation"]
    assert sorted(map(sorted, best.placement.iloc[0])) == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert best.balancedness.iloc[0] == pytest.approx(1.0)
    assert best.copies_per_step.iloc[0] == 12  # 16 tokens, 4 of them live on their pair's device
    assert best.bytes_per_step.iloc[0] == 12 * 8 * 2
    assert best.traffic_ratio.iloc[0] == pytest.approx(0.5)
    assert (df.staleness == 0).all()  # both windows carry the same traffic


def test_rows_written_out_of_order_give_the_same_answer(store):
    write_trace(store, "ordered", EIGHT, num_experts=8, top_k=2)
    write_trace(store, "shuffled", EIGHT, num_experts=8, top_k=2, shuffle_seed=3)
    a = compute_metric(store, "placement", "ordered", ep_size=4, policy="all")
    b = compute_metric(store, "placement", "shuffled", ep_size=4, policy="all")
    assert a.equals(b)


def test_sampled_routing_rows_scale_copies_to_the_exact_token_count(store, replay_path):
    # 16 tokens (the eight twice; pos + 8 has the same home), routing rows kept for the first 8 only
    trace = {0: EIGHT[0] + [(pos + 8, experts) for pos, experts in EIGHT[0]]}
    write_trace(store, "sampled", trace, num_experts=8, top_k=2, routing_positions=set(range(8)))
    df = compute_metric(store, "placement", "sampled", ep_size=4)
    assert _devices(df, "tokens") == [12, 6, 6, 8]  # exact, from expert_step
    assert _devices(df, "copies_sent") == [2, 4, 4, 2]  # the sample's copies × 16 / 8


@pytest.mark.parametrize("kwargs, fragment", [
    ({"ep_size": 0}, "ep_size must be an int >= 1"),
    ({"ep_size": 3}, "do not divide over ep_size 3"),
    ({"ep_size": 4, "gpus_per_node": 3}, "gpus_per_node"),
    ({"ep_size": 4, "policy": "best"}, "policy must be one of"),
    ({"ep_size": 4, "policy": "map"}, "needs expert_map"),
    ({"ep_size": 4, "expert_map": [0, 1]}, "places no device for expert"),
    ({"ep_size": 4, "expert_map": [0, 1, 2, 3, 0, 1, 2, 9]}, "devices are 0..3"),
    ({"ep_size": 4, "dtype": "fp7"}, "dtype must be one of"),
    ({"ep_size": 4, "fit_steps": (5, 1)}, "lo <= hi"),
    ({"ep_size": 4, "fit_steps": (100, 200)}, "no expert_step rows"),
    ({"ep_size": 4, "capacity": 2}, "does not take option"),
])
def test_bad_options_are_one_line_value_errors(eight, kwargs, fragment):
    with pytest.raises(ValueError, match=None) as err:
        compute_metric(eight, "placement", "eight", **kwargs)
    assert fragment in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("batch_rows", [1, 3, 5])
def test_tokens_cut_by_batch_boundaries_count_the_same(eight, monkeypatch, batch_rows):
    expert_map = {0: [0, 2], 1: [0, 3], 2: 1, 3: 1, 4: 2, 5: 2, 6: 3, 7: [3, 1]}
    whole = compute_metric(eight, "placement", "eight", ep_size=4, gpus_per_node=2, policy=["round_robin", "map"],
                           expert_map=expert_map)
    monkeypatch.setattr(pr, "BATCH_ROWS", batch_rows)
    pr.CACHE.clear()  # read the rows again, in small batches
    placement_module.PRICED.clear()
    cut = compute_metric(eight, "placement", "eight", ep_size=4, gpus_per_node=2, policy=["round_robin", "map"],
                         expert_map=expert_map)
    assert np.allclose(cut.select_dtypes("number"), whole.select_dtypes("number"), equal_nan=True)


@pytest.mark.parametrize("ascending", [True, False])
def test_signature_counts_of_several_batches_sum_per_value_sorted_or_not(ascending):
    rng = np.random.default_rng(1)
    u = np.sort(rng.integers(0, 50, 300)) if ascending else rng.integers(0, 50, 300)  # ascending: steps in order
    cnt = rng.integers(1, 9, 300).astype(np.float64)
    values, sums = pr.sum_by_value(u, cnt)
    want = pd.Series(cnt).groupby(u).sum()
    assert values.tolist() == want.index.tolist() and sums.tolist() == want.tolist()


def test_signature_counter_into_one_array_counts_as_batch_by_batch():
    # steps 3..10, one layer, 4 homes, E=4, K=2: keys (step - 3) · 4 + home, each token's two rows with distinct experts
    space = pr.Space((0,), 4, 4, 2)
    rng = np.random.default_rng(5)
    steps = np.sort(rng.integers(3, 11, 500))
    key = np.repeat((steps - 3) * 4 + rng.integers(0, 4, 500), 2)
    first = rng.integers(0, 4, 500)
    expert = np.stack([first, (first + rng.integers(1, 4, 500)) % 4], 1).ravel()
    counted = []
    for hi in (None, 10, 6):  # 6: later steps fall outside the array and are counted batch by batch
        counter = pr.SignatureCounter(space, 3, hi)
        for lo in range(0, 1000, 134):  # batches cut tokens in two
            counter.add({"key": key[lo:lo + 134], "expert": expert[lo:lo + 134]})
        counted.append(counter.finish())
    for c in counted[1:]:
        for field in ("step", "cell_sig", "count"):
            assert getattr(c, field).tolist() == getattr(counted[0], field).tolist()
    assert counted[0].count.sum() == 500


def test_tokens_with_varying_expert_counts_replay_row_by_row(store):
    # expert-choice style: tokens take 1 to 3 experts; copies = distinct remote devices of each token
    tokens = [(0, (0,)), (1, (0, 2, 4)), (2, (5,)), (3, (1, 7)), (4, (3, 2, 6)), (5, (7,)), (6, (6, 0)), (7, (4, 5, 1))]
    write_trace(store, "varying", {0: tokens}, num_experts=8, top_k=3)
    df = compute_metric(store, "placement", "varying", ep_size=4)
    sent, recv = np.zeros(4), np.zeros(4)
    for pos, experts in tokens:
        for d in {e // 2 for e in experts} - {pos % 4}:
            sent[pos % 4] += 1
            recv[d] += 1
    assert _devices(df, "copies_sent") == sent.tolist()
    assert _devices(df, "copies_recv") == recv.tolist()


def test_cli_whatif_placement_prints_the_policies_and_the_suggested_map(store, capsys):
    write_trace(store, "skew", top1_trace([8, 7, 6, 5, 4, 3, 2, 1], [0, 1]), num_experts=8, top_k=1)
    code = main(["whatif", "placement", "skew", "--store", str(store.root), "--ep-size", "4", "--policy", "contiguous", "eplb",
                 "--fit-steps", "0:0", "--steps", "1:1", "--hidden-size", "8"])
    out = capsys.readouterr().out
    assert code == 0
    assert "contiguous" in out and "eplb" in out
    assert "layer 0: suggested eplb (balancedness 1.000, x1.67 over contiguous)" in out


def test_cli_whatif_cache_prints_hit_rates(store, capsys):
    write_trace(store, "c", {0: [(0, (0,)), (1, (0,)), (2, (1,))]}, num_experts=2, top_k=1)
    assert main(["whatif", "cache", "c", "--store", str(store.root), "--cache-sizes", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["layer", "cache_size", "num_experts", "coverage", "lru_hit_rate", "lfu_hit_rate", "accesses"]
    assert out[1].split() == ["0", "1", "2", f"{2 / 3:.6f}", f"{1 / 3:.6f}", f"{1 / 3:.6f}", "3"]


@pytest.mark.parametrize("argv, fragment", [
    (["whatif", "placement", "nope"], "unknown run 'nope'"),
    (["whatif", "placement", "eight", "--ep-size", "3"], "do not divide over ep_size 3"),
    (["whatif", "placement", "eight", "--steps", "0-5"], "--steps must be integers"),
    (["whatif", "placement", "eight", "--expert-map", "0,1,x"], "--expert-map must be integers"),
    (["whatif", "placement", "eight", "--phase", "decode"], "no expert_step rows"),
])
def test_cli_whatif_mistakes_are_one_line_errors(eight, capsys, argv, fragment):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--store", str(eight.root)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and fragment in err[0]


def test_cli_whatif_refuses_a_store_that_does_not_exist(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["whatif", "cache", "r", "--store", str(tmp_path / "missing")])
    assert exit_.value.code == 2 and "no store at" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()


README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_what_if_example_runs_as_written(tmp_path, monkeypatch, capsys):
    section = README.read_text().split("## What-if", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    command = section.split("`moescope whatif ", 1)[1].split("`", 1)[0]
    monkeypatch.chdir(tmp_path)
    from moescope.analysis.store import AnalysisStore as Store

    store = Store(tmp_path / "moescope-data")
    trace = {s: [(pos, ((pos + s) % 8, (pos * 3 + 1) % 8 if (pos * 3 + 1) % 8 != (pos + s) % 8 else (pos + s + 1) % 8))
                 for pos in range(16)] for s in (0, 50, 100, 150)}
    write_trace(store, "my-run", trace, num_experts=8, top_k=2)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    placed = namespace["store"].metric("placement", run="my-run", ep_size=4, gpus_per_node=2, policy="all", by="window",
                                       fit_steps=(0, 99), steps=(100, 199), hidden_size=4096, dtype="bf16")
    assert placed.suggested.sum() == 1 and placed.bytes_per_step.notna().all()
    assert main(["whatif", *command.split()]) == 0
    assert "suggested" in capsys.readouterr().out


def test_staleness_is_what_fitting_on_past_traffic_costs_against_hindsight(store):
    trace = top1_trace([8, 7, 6, 5, 4, 3, 2, 1], [0, 1])
    trace.update(top1_trace([8, 6, 4, 2, 1, 3, 5, 7], [2, 3]))  # the past map's pairs now add up to 15, 11, 7, 3
    write_trace(store, "drift", trace, num_experts=8, top_k=1)
    row = compute_metric(store, "placement", "drift", ep_size=4, policy="eplb", by="window",
                         fit_steps=(0, 1), steps=(2, 3)).iloc[0]
    assert row.placement == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert row.balancedness == pytest.approx(9 / 15)
    assert row.balancedness_hindsight == pytest.approx(1.0)
    assert row.staleness == pytest.approx(1 - 9 / 15)


def _random_trace(rng, steps, tokens=24, experts=8, k=2):
    return {int(s): [(pos, tuple(int(e) for e in rng.choice(experts, k, replace=False))) for pos in range(tokens)]
            for s in steps}


def test_counts_kept_between_queries_follow_the_run_as_it_grows_and_is_compacted(store):
    rng = np.random.default_rng(5)
    options = dict(ep_size=4, gpus_per_node=2, policy="all", by="window", fit_steps=(0, 3), steps=(4, 11), hidden_size=8)
    write_trace(store, "live", _random_trace(rng, range(0, 8)), num_experts=8, top_k=2)
    compute_metric(store, "placement", "live", **options)  # counts steps 0..7, kept
    write_trace(store, "live", _random_trace(rng, range(8, 12)), num_experts=8, top_k=2, producer="second")
    grown = compute_metric(store, "placement", "live", **options)
    pr.CACHE.clear()
    placement_module.PRICED.clear()
    assert grown.equals(compute_metric(store, "placement", "live", **options))  # as if read from scratch
    assert store.compact("live", min_files=2) > 0  # segments retired: counts kept for them are dropped
    compacted = compute_metric(store, "placement", "live", **options)
    assert np.allclose(compacted.select_dtypes("number"), grown.select_dtypes("number"), equal_nan=True)


def test_window_and_step_views_share_one_read_of_the_rows(store, monkeypatch):
    write_trace(store, "eight", EIGHT, num_experts=8, top_k=2)
    first = compute_metric(store, "placement", "eight", ep_size=4, policy="all", by="step")

    def no_reads(*args, **kwargs):
        raise AssertionError("routing rows read again")
    monkeypatch.setattr(pr, "stream_sql", no_reads)
    assert compute_metric(store, "placement", "eight", ep_size=4, policy="all", by="step").equals(first)
    assert _devices(compute_metric(store, "placement", "eight", ep_size=4, hidden_size=16), "copies_sent") == [1, 2, 2, 1]
    compute_metric(store, "placement", "eight", ep_size=4, policy="eplb", by="window")


def test_coactivation_policy_fits_the_same_map_from_the_rollup_as_from_rows(store, monkeypatch):
    pairs = [(0, 7), (1, 6), (2, 5), (3, 4)]
    write_trace(store, "pairs", {s: [(4 * q + r, pairs[q]) for q in range(4) for r in range(4)] for s in range(4)},
                num_experts=8, top_k=2)
    options = dict(ep_size=4, policy="coactivation", by="window", fit_steps=(0, 1), steps=(2, 3))
    rollup = compute_metric(store, "placement", "pairs", **options)
    monkeypatch.setattr(placement_module, "has_rollups", lambda *a, **k: False)
    rows = compute_metric(store, "placement", "pairs", **options)
    assert rollup.placement.tolist() == rows.placement.tolist()
    assert sorted(map(sorted, rows.placement.iloc[0])) == [[0, 7], [1, 6], [2, 5], [3, 4]]
