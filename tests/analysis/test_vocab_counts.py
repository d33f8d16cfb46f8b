import numpy as np
import pandas as pd
import pytest

from moescope.analysis import vocab_counts
from moescope.analysis.vocab_counts import shares


def reference(counts: pd.DataFrame, min_count: int, top: int | None) -> pd.DataFrame:
    """The definition, spelled out with one full sort (what vocab_specialisation's SQL does)."""
    v = counts.assign(tokens=counts.groupby(["layer", "x"])["top1"].transform("sum"))
    v = v[v.tokens >= min_count]
    v = pd.DataFrame({"layer": v.layer, "token_id": v.x, "expert": v.expert, "tokens": v.tokens.astype("int64"),
                      "routed": v.routed.astype("int64"), "share": v.routed / v.tokens})
    if top:
        v = (v.sort_values(["share", "tokens", "token_id"], ascending=[False, False, True], kind="stable")
             .groupby(["layer", "expert"], sort=False).head(top))
    return v.sort_values(["layer", "token_id", "expert"], kind="stable").reset_index(drop=True)


@pytest.mark.parametrize("in_order", [False, True])  # as a GROUP BY returns them, or sorted as the dense counts come
@pytest.mark.parametrize("top", [None, 1, 3, 50])
def test_each_experts_top_ids_equal_a_full_sort_of_every_row_ties_included(top, in_order):
    rng = np.random.default_rng(7)
    n = 20_000
    # Few distinct counts, so many (share, tokens) ties that only the id decides.
    counts = pd.DataFrame({"layer": rng.integers(0, 3, n).astype(np.int16), "x": rng.integers(0, 400, n).astype(np.int32),
                           "expert": rng.integers(0, 16, n).astype(np.int16)}).drop_duplicates(["layer", "x", "expert"])
    counts["routed"] = rng.integers(1, 4, len(counts)).astype(np.int64)
    counts["top1"] = np.minimum(counts.routed, rng.integers(0, 3, len(counts))).astype(np.int64)
    counts = counts.sample(frac=1, random_state=1).reset_index(drop=True)  # the order a GROUP BY returns: none
    if in_order:
        counts = counts.sort_values(["layer", "x", "expert"]).reset_index(drop=True)
    got = shares(counts, "token_id", 2, top)
    pd.testing.assert_frame_equal(got, reference(counts, 2, top))
    if top:
        assert got.groupby(["layer", "expert"]).size().max() == min(top, counts.groupby(["layer", "expert"]).size().max())


def test_no_id_seen_often_enough_gives_an_empty_frame_with_the_columns():
    counts = pd.DataFrame({"layer": [0], "x": [5], "expert": [1], "routed": [1], "top1": [1]})
    got = shares(counts, "token_id", 10, 3)
    assert got.empty and list(got.columns) == ["layer", "token_id", "expert", "tokens", "routed", "share"]


def grouped(rows: pd.DataFrame) -> pd.DataFrame:
    """What the GROUP BY returns: (layer, id, expert) routed rows and slot-0 rows."""
    out = rows.assign(top1=rows.slot == 0).groupby(["layer", "x", "expert"], as_index=False).agg(
        routed=("slot", "size"), top1=("top1", "sum"))
    return out.astype({"routed": "int64", "top1": "int64"})


def test_dense_counts_folded_batch_by_batch_equal_a_group_by_as_ids_and_experts_grow():
    rng = np.random.default_rng(3)
    batches = []
    for i, (ids, experts) in enumerate([(50, 4), (50, 4), (900, 4), (900, 11), (20, 2)]):  # grows in both axes
        n = 3000
        layer = np.full(n, 5, np.int16) if i == 1 else rng.choice(np.array([0, 5, 7], np.int16), n)  # one layer, or mixed
        batches.append(pd.DataFrame({"layer": layer, "x": rng.integers(0, ids, n).astype(np.int32),
                                     "expert": rng.integers(0, experts, n).astype(np.int16),
                                     "slot": rng.integers(0, 2, n).astype(np.int8)}))
    counts = vocab_counts._DenseCounts()
    for b in batches:
        assert counts.add(*(b[c].to_numpy() for c in ("layer", "x", "expert", "slot")))
    got = counts.frame().sort_values(["layer", "x", "expert"]).reset_index(drop=True)
    want = grouped(pd.concat(batches, ignore_index=True))
    pd.testing.assert_frame_equal(got, want, check_dtype=False)
    assert (got.dtypes.to_dict() == vocab_counts._empty().dtypes.to_dict())


def test_an_id_space_past_the_dense_bound_is_left_to_the_group_by(monkeypatch):
    monkeypatch.setattr(vocab_counts._DenseCounts, "DENSE_CELLS", 100)
    counts = vocab_counts._DenseCounts()
    ok = counts.add(np.zeros(3, np.int16), np.array([1, 2, 3], np.int32), np.array([0, 1, 0], np.int16),
                    np.zeros(3, np.int8))
    assert ok and not counts.add(np.zeros(1, np.int16), np.array([60], np.int32), np.array([1], np.int16),
                                 np.zeros(1, np.int8))


@pytest.mark.parametrize("rows", [10, 100_000])  # fewer rows than cells: sorted; more: bincount
def test_a_batch_is_counted_into_its_cells_whichever_way_is_cheaper(rows):
    rng = np.random.default_rng(rows)
    key = rng.integers(0, 64 * 500, rows)
    counts = np.ones((500, 64), np.int64)
    vocab_counts._count_into(counts, key)
    assert np.array_equal(counts, 1 + np.bincount(key, minlength=counts.size).reshape(counts.shape))
