import numpy as np
import pandas as pd
import pytest

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


@pytest.mark.parametrize("top", [None, 1, 3, 50])
def test_each_experts_top_ids_equal_a_full_sort_of_every_row_ties_included(top):
    rng = np.random.default_rng(7)
    n = 20_000
    # Few distinct counts, so many (share, tokens) ties that only the id decides.
    counts = pd.DataFrame({"layer": rng.integers(0, 3, n).astype(np.int16), "x": rng.integers(0, 400, n).astype(np.int32),
                           "expert": rng.integers(0, 16, n).astype(np.int16)}).drop_duplicates(["layer", "x", "expert"])
    counts["routed"] = rng.integers(1, 4, len(counts)).astype(np.int64)
    counts["top1"] = np.minimum(counts.routed, rng.integers(0, 3, len(counts))).astype(np.int64)
    counts = counts.sample(frac=1, random_state=1).reset_index(drop=True)  # the order a GROUP BY returns: none
    got = shares(counts, "token_id", 2, top)
    pd.testing.assert_frame_equal(got, reference(counts, 2, top))
    if top:
        assert got.groupby(["layer", "expert"]).size().max() == min(top, counts.groupby(["layer", "expert"]).size().max())


def test_no_id_seen_often_enough_gives_an_empty_frame_with_the_columns():
    counts = pd.DataFrame({"layer": [0], "x": [5], "expert": [1], "routed": [1], "top1": [1]})
    got = shares(counts, "token_id", 10, 3)
    assert got.empty and list(got.columns) == ["layer", "token_id", "expert", "tokens", "routed", "share"]
