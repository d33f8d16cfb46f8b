"""mismatch: the same tokens routed twice, compared from the recorded routing rows."""
import sys
from pathlib import Path

import pytest

from moescope.scenarios import mismatch

sys.path.insert(0, str(Path(__file__).parent))
from scenario_helpers import TINY, context  # noqa: E402


@pytest.fixture(scope="module")
def report(module_store):
    return mismatch.run(context(module_store, "mm", steps=8), setup=TINY, sequences_per_domain=8, with_triton=False)


def _rates(report):
    return report.tables["tokens whose top-k set differs"].set_index("comparison")


def test_identical_forwards_differ_nowhere(report):
    row = _rates(report).loc["fp32 vs fp32, same forward twice"]
    assert row.tokens > 0
    assert (row.drop("tokens") == 0).all()


def test_bf16_weights_change_some_top_k_sets(report):
    row = _rates(report).loc["fp32 vs bf16 weights"]
    assert row["any layer (%)"] > 0
    # A token differing in some layer is counted once: the any-layer share is at least each layer's.
    assert row["any layer (%)"] >= row[[c for c in row.index if c.startswith("layer ")]].max()


def test_rates_are_computed_from_recorded_rows(report, module_store):
    run = report.runs[0]
    per_layer, anywhere = mismatch.topk_mismatch(module_store, run, "fp32", "fp32-again")
    assert anywhere == 0.0 and (per_layer.differs == 0).all()
    assert sorted(per_layer.layer) == list(range(TINY.num_layers))
