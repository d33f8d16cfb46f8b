"""capacity: fewer tokens dropped as the capacity factor rises, and fewer with the aux loss."""
import sys
from pathlib import Path

import pytest

from moescope.scenarios import capacity

sys.path.insert(0, str(Path(__file__).parent))
from scenario_helpers import TINY, context  # noqa: E402

FACTORS = (0.75, 1.25, 2.0)


@pytest.fixture(scope="module")
def report(module_store):
    return capacity.run(context(module_store, "cap", steps=24), routers=("top2",), factors=FACTORS, setup=TINY)


def _drops(report):
    table = next(df for caption, df in report.tables.items() if caption.startswith("tokens dropped"))
    return table.set_index("aux loss")[[f"cf {f:g}" for f in FACTORS]]


def test_drops_fall_as_the_capacity_factor_rises(report):
    for _, row in _drops(report).iterrows():
        assert list(row) == sorted(row, reverse=True)
        assert row.iloc[0] >= 25.0  # below the fair share (0.75) at least a quarter of the slots must drop
    assert report.checks["drops fall as the capacity factor rises (every router, with and without the loss)"]


def test_the_aux_loss_lowers_drops_summed_over_factors(report):
    drops = _drops(report)
    assert drops.loc["with"].sum() < drops.loc["without"].sum()


def test_drop_rate_by_position_is_read_back_for_both_runs(report):
    table = next(df for caption, df in report.tables.items() if "by position" in caption)
    assert list(table["aux loss"]) == ["with", "without"]
    assert [c for c in table.columns if c.startswith("pos ")] == ["pos 0-7", "pos 8-15", "pos 16-23", "pos 24-31"]


def test_every_run_is_recorded_in_the_store(report, module_store):
    assert set(report.runs) <= set(module_store.runs().run)
    assert len(report.runs) == 2 * len(FACTORS)
