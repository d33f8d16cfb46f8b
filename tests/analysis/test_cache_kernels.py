"""The C replays of the expert-cache what-if against plain simulations, and the metric with and without them."""
import random
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from whatif_traces import simulate  # noqa: E402

from moescope.analysis import cache_kernels, compute_metric  # noqa: E402
from moescope.analysis import expert_cache as ec  # noqa: E402
from moescope.frame import Frame  # noqa: E402
from moescope.schema import EXPERT_STEP, ROUTING  # noqa: E402


def test_kernels_and_fallbacks_equal_a_plain_simulation():
    assert cache_kernels.kernel() is not None  # this machine has a C compiler: the kernels are under test
    rng = np.random.default_rng(0)
    for _ in range(60):
        experts = int(rng.integers(1, 20))
        xs = rng.choice(experts, int(rng.integers(1, 300)), p=rng.dirichlet(np.full(experts, rng.choice([0.3, 3.0]))))
        sizes = list(range(1, experts + 2))  # sizes over 8 take the kernel's heap
        lru = ec.lru_hits(xs, sizes)
        distances = ec._stack_distances(xs)
        assert (cache_kernels.lru_distances(xs, experts) == distances).all()
        for size in sizes:
            want_lru, want_lfu = simulate(xs.tolist(), size)
            assert lru[size].tolist() == want_lru
            assert ec.lfu_hits(xs, size).tolist() == want_lfu
            assert cache_kernels.lfu_replay(xs, experts, size).tolist() == want_lfu
            assert cache_kernels.lfu_replay_python(xs.tolist(), experts, size).tolist() == want_lfu


@pytest.mark.parametrize("dtype", [np.int16, np.int32])
@pytest.mark.parametrize("experts", [1, 5, 8, 9, 16, 17, 40])  # LRU: up to 8 ids in 64 bits, 16 in 128, beyond a list
def test_per_step_kernels_equal_a_plain_simulation_summed_per_step(dtype, experts):
    rng = np.random.default_rng(experts)
    for _ in range(12):
        n = int(rng.integers(1, 400))
        xs = rng.choice(experts, n, p=rng.dirichlet(np.full(experts, rng.choice([0.3, 3.0])))).astype(dtype)
        cuts = np.sort(rng.choice(np.arange(1, n), min(n - 1, int(rng.integers(0, 12))), replace=False)) if n > 1 else []
        step_n = np.diff(np.r_[0, cuts, n])
        starts = np.r_[0, np.cumsum(step_n)[:-1]]
        distances = ec._stack_distances(xs)
        hist = cache_kernels.lru_step_hist(xs, experts, step_n)
        for s, (lo, hi) in enumerate(zip(starts, starts + step_n)):
            assert hist[s].tolist() == np.bincount(np.where(distances[lo:hi] < 0, experts, distances[lo:hi]),
                                                   minlength=experts + 1).tolist()
        for size in range(1, experts + 2):
            _, want = simulate(xs.tolist(), size)
            assert cache_kernels.lfu_step_hits(xs, experts, size, step_n).tolist() == \
                [sum(want[lo:hi]) for lo, hi in zip(starts, starts + step_n)]


def test_per_step_kernels_refuse_counts_that_do_not_cover_the_accesses():
    with pytest.raises(ValueError, match="sum to the 3 accesses"):
        cache_kernels.lfu_step_hits(np.array([0, 1, 0]), 2, 1, np.array([1, 1]))


def write_frames(store, run, rng, ranks=2, checkpoints=("a", "b"), steps=3, experts=6, k=2, producer="p", shuffle=True):
    """Tokens over ranks, checkpoints, microbatches and sequences; each frame's rows shuffled unless told not to.
    Returns the rows."""
    meta = {"layers": [{"layer": layer, "module_path": f"l{layer}", "num_experts": experts, "top_k": k,
                        "router_kind": "softmax-topk", "capacity_factor": None} for layer in (0, 1)]}
    everything, seq_no = [], 0
    for rank in range(ranks):
        for step in range(steps):
            for checkpoint in checkpoints:
                rows = []
                for layer in (0, 1):
                    for mb in range(2):
                        for seq in range(2):
                            for pos in range(int(rng.integers(1, 6))):
                                chosen = rng.choice(experts, k, replace=False, p=rng.dirichlet(np.ones(experts)))
                                rows += [dict(run=run, checkpoint=checkpoint, step=step, rank=rank, microbatch=mb, seq=seq,
                                              pos=pos, token_id=-1, layer=layer, slot=slot, expert=int(e), weight=0.5,
                                              dropped=False, domain=None, phase="train") for slot, e in enumerate(chosen)]
                if shuffle:
                    random.Random(seq_no).shuffle(rows)
                agg = [dict(run=run, checkpoint=checkpoint, step=step, rank=rank, layer=layer, expert=x,
                            num_tokens=sum(1 for r in rows if r["layer"] == layer and r["slot"] == 0),
                            tokens=sum(1 for r in rows if r["layer"] == layer and r["expert"] == x), dropped=0, top1=0,
                            prob_sum=0.0, weight_sum=0.0, phase="train") for layer in (0, 1) for x in range(experts)]
                store.write_frame(Frame(run=run, producer=f"{producer}{rank}", seq=seq_no, meta=meta, tables={
                    "routing": pa.Table.from_pylist(rows, schema=ROUTING),
                    "expert_step": pa.Table.from_pylist(agg, schema=EXPERT_STEP)}))
                everything += rows
                seq_no += 1
    return everything


def expected_rates(rows, sizes, steps=None):
    """Hit rates per (layer, cache size): each (layer, rank) cache replayed over its rows in token order."""
    key = lambda r: (r["step"], r["checkpoint"], r["microbatch"], r["seq"], r["pos"], r["slot"])  # noqa: E731
    out = {}
    for layer in (0, 1):
        for size in sizes:
            hits = [0, 0, 0]
            for rank in sorted({r["rank"] for r in rows}):
                mine = sorted((r for r in rows if r["layer"] == layer and r["rank"] == rank
                               and (steps is None or steps[0] <= r["step"] <= steps[1])), key=key)
                lru, lfu = simulate([r["expert"] for r in mine], size)
                hits = [hits[0] + sum(lru), hits[1] + sum(lfu), hits[2] + len(mine)]
            out[layer, size] = (hits[0] / hits[2], hits[1] / hits[2])
    return out


def assert_rates_expected(store, run, rows, sizes, windows=(None, (1, 2))):
    for steps in windows:
        df = compute_metric(store, "expert_cache", run, cache_sizes=sizes, steps=steps)
        want = expected_rates(rows, sizes, steps)
        assert len(df) == len(want)
        for r in df.itertuples():
            assert (r.lru_hit_rate, r.lfu_hit_rate) == pytest.approx(want[r.layer, r.cache_size])


@pytest.mark.parametrize("path", ["order key", "sorted by DuckDB", "no C compiler"])
def test_hit_rates_follow_token_order_over_ranks_checkpoints_and_microbatches(store, monkeypatch, path):
    rows = write_frames(store, "mixed", np.random.default_rng(3))
    if path == "sorted by DuckDB":
        monkeypatch.setattr(ec._OrderKey, "plan", staticmethod(lambda *a, **k: None))
    if path == "no C compiler":
        monkeypatch.setattr(cache_kernels, "kernel", lambda: None)
    ec.STREAMS.clear()
    assert_rates_expected(store, "mixed", rows, [1, 2, 3, 5])


@pytest.mark.parametrize("shuffle", [False, True])
def test_rows_read_in_token_order_are_replayed_without_a_sort(store, monkeypatch, shuffle):
    rows = write_frames(store, "ordered", np.random.default_rng(6), checkpoints=("a",), shuffle=shuffle)
    sorts = []
    monkeypatch.setattr(ec, "_in_key_order", lambda *a, _f=ec._in_key_order: sorts.append(1) or _f(*a))
    ec.STREAMS.clear()
    sizes = [1, 2, 3, 5]
    for layer in (0, 1):  # one layer, as the page asks: its rows come out of the segments in token order
        for steps in (None, (1, 2)):
            df = compute_metric(store, "expert_cache", "ordered", cache_sizes=sizes, steps=steps, layers=[layer])
            want = expected_rates(rows, sizes, steps)
            assert [(r.lru_hit_rate, r.lfu_hit_rate) for r in df.itertuples()] == \
                pytest.approx([want[layer, size] for size in sizes])
    assert bool(sorts) == shuffle


def test_streams_are_read_once_until_the_run_writes_again(store, monkeypatch):
    rng = np.random.default_rng(4)
    rows = write_frames(store, "grow", rng, ranks=1, checkpoints=("a",), steps=2)
    ec.STREAMS.clear()
    first = compute_metric(store, "expert_cache", "grow", cache_sizes=[2])
    reads = []
    original = store.arrow
    monkeypatch.setattr(store, "arrow", lambda *a, **k: reads.append(a) or original(*a, **k))
    assert compute_metric(store, "expert_cache", "grow", cache_sizes=[2]).equals(first)
    per_step = compute_metric(store, "expert_cache", "grow", cache_sizes=[1, 3], by="step")  # other sizes, same rows
    assert not any("routing" in q[0] for q in reads)
    hits = per_step.assign(lru=per_step.lru_hit_rate * per_step.accesses, lfu=per_step.lfu_hit_rate * per_step.accesses)
    whole = expected_rates(rows, [1, 3])
    for (layer, size), r in hits.groupby(["layer", "cache_size"])[["lru", "lfu", "accesses"]].sum().iterrows():
        assert (r.lru / r.accesses, r.lfu / r.accesses) == pytest.approx(whole[layer, size])
    more = write_frames(store, "grow", np.random.default_rng(5), ranks=1, checkpoints=("b",), steps=2, producer="q")
    df = compute_metric(store, "expert_cache", "grow", cache_sizes=[2])
    want = expected_rates(rows + more, [2])
    assert [(r.lru_hit_rate, r.lfu_hit_rate) for r in df.itertuples()] == pytest.approx([want[0, 2], want[1, 2]])


def planned(monkeypatch) -> list:
    plans = []
    plan = ec._OrderKey.plan
    monkeypatch.setattr(ec._OrderKey, "plan", staticmethod(lambda *a: plans.append(plan(*a)) or plans[-1]))
    return plans


def test_segments_recorded_in_token_order_are_read_as_experts_and_step_counts_alone(store, monkeypatch):
    rows = write_frames(store, "flagged", np.random.default_rng(8), checkpoints=("a",), shuffle=False)
    plans = planned(monkeypatch)
    ec.STREAMS.clear()
    assert_rates_expected(store, "flagged", rows, [1, 2, 3, 5])
    assert plans and all(p.presorted for p in plans)
    by_step = compute_metric(store, "expert_cache", "flagged", cache_sizes=[2, 3], by="step", steps=(1, 2))
    monkeypatch.setattr(ec._OrderKey, "plan", staticmethod(lambda *a, **k: None))  # DuckDB sorts every row instead
    ec.STREAMS.clear()
    assert by_step.equals(compute_metric(store, "expert_cache", "flagged", cache_sizes=[2, 3], by="step", steps=(1, 2)))
    ec.STREAMS.clear()
    monkeypatch.undo()
    plans = planned(monkeypatch)
    nothing = compute_metric(store, "expert_cache", "flagged", cache_sizes=[2], phase="eval")  # no row of that phase
    assert nothing.empty and plans[-1].presorted


def test_a_ranks_segments_that_overlap_in_steps_are_read_with_the_full_token_key(store, monkeypatch):
    # Each segment is in token order, but two cover the same steps (checkpoints a and b): order between them is
    # the checkpoint's, which only the full key knows.
    rows = write_frames(store, "overlap", np.random.default_rng(9), ranks=1, checkpoints=("a",), shuffle=False)
    rows += write_frames(store, "overlap", np.random.default_rng(10), ranks=1, checkpoints=("b",), shuffle=False,
                         producer="q")
    plans = planned(monkeypatch)
    ec.STREAMS.clear()
    assert_rates_expected(store, "overlap", rows, [2, 3], windows=(None,))
    assert plans and all("pos" in p.sql for p in plans)
