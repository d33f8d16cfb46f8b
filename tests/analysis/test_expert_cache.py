"""Hot-set cache what-if: coverage and LRU / LFU hit rates against hand-simulated sequences."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from whatif_traces import simulate, write_trace  # noqa: E402

from moescope.analysis import compute_metric  # noqa: E402
from moescope.analysis.expert_cache import lfu_hits, lru_hits  # noqa: E402

# Top-1 accesses in token order; steps 0 (pos 0..4) and 1 (pos 0..4).
SEQUENCE = [0, 1, 0, 2, 1, 3, 0, 0, 2, 1]
TRACE = {0: [(pos, (e,)) for pos, e in enumerate(SEQUENCE[:5])], 1: [(pos, (e,)) for pos, e in enumerate(SEQUENCE[5:])]}


@pytest.fixture
def cached(store):
    # steps and rows written shuffled: the replay must follow token order, not write order
    write_trace(store, "cache", TRACE, num_experts=4, top_k=1, shuffle_seed=7)
    return store


def test_hit_rates_equal_a_hand_simulation(cached):
    df = compute_metric(cached, "expert_cache", "cache", cache_sizes=[1, 2, 4]).set_index("cache_size")
    # LRU of 2: hits at accesses 2 (0 after 0,1) and 7 (0 after 0); every other access evicts
    # LFU of 2: also hits at 6 (0 was kept: used twice, while 2, 1, 3 each come in once)
    # LRU / LFU of 1: only the repeat at 7; of 4: everything after the 4 cold misses
    assert df.lru_hit_rate.to_dict() == pytest.approx({1: 0.1, 2: 0.2, 4: 0.6})
    assert df.lfu_hit_rate.to_dict() == pytest.approx({1: 0.1, 2: 0.3, 4: 0.6})
    # loads 4, 3, 2, 1 of 10
    assert df.coverage.to_dict() == pytest.approx({1: 0.4, 2: 0.7, 4: 1.0})
    assert (df.accesses == 10).all() and (df.num_experts == 4).all()


def test_per_step_rows_split_the_continuous_replay(cached):
    df = compute_metric(cached, "expert_cache", "cache", cache_sizes=[2], by="step")
    assert df.step.tolist() == [0, 1]
    assert df.accesses.tolist() == [5, 5]
    assert df.lru_hit_rate.tolist() == pytest.approx([1 / 5, 1 / 5])  # accesses 2 and 7
    assert df.lfu_hit_rate.tolist() == pytest.approx([1 / 5, 2 / 5])  # 2; then 6 and 7
    assert df.coverage.tolist() == pytest.approx([4 / 5, 3 / 5])  # each step's own top 2: 0 and 1 twice each of 5; then 0 twice + one single


def test_slots_of_one_token_are_accessed_in_slot_order(store):
    write_trace(store, "top2", {0: [(0, (0, 1)), (1, (2, 0)), (2, (1, 2))]}, num_experts=3, top_k=2)
    df = compute_metric(store, "expert_cache", "top2", cache_sizes=[2]).iloc[0]
    # 0 1 | 2 0 | 1 2 under LRU 2: miss miss | miss(evict 0) miss(evict 1) | miss(evict 2) miss(evict 0)
    assert df.lru_hit_rate == 0.0 and df.accesses == 6
    assert lru_hits(np.array([0, 1, 2, 0, 1, 2]), [3])[3].tolist() == [False] * 3 + [True] * 3


def test_each_rank_has_its_own_cache(store):
    write_trace(store, "ranks", {0: [(0, (0,)), (1, (0,))]}, num_experts=2, top_k=1, rank=0)
    write_trace(store, "ranks", {0: [(0, (1,)), (1, (1,))]}, num_experts=2, top_k=1, rank=1)
    df = compute_metric(store, "expert_cache", "ranks", cache_sizes=[1]).iloc[0]
    assert df.lru_hit_rate == 0.5 and df.lfu_hit_rate == 0.5  # one cold miss per rank, then a hit


def test_lru_stack_distance_matches_a_direct_simulation():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, 400)
    fast = lru_hits(x, [1, 2, 3, 5])
    for size in (1, 2, 3, 5):
        assert fast[size].tolist() == simulate(x.tolist(), size)[0]
    assert lfu_hits(np.array([0, 0, 1, 2, 1, 2]), 2).tolist() == [False, True, False, False, False, False]


@pytest.mark.parametrize("sizes", [[], [0], "4", [1.5], [True]])
def test_bad_cache_sizes_are_one_line_value_errors(cached, sizes):
    with pytest.raises(ValueError, match="cache_sizes must be a list of positive ints"):
        compute_metric(cached, "expert_cache", "cache", cache_sizes=sizes)
