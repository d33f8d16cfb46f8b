"""collapse / balanced: a planted router fault is flagged at its layer; the balanced twin is not flagged."""
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from moescope.scenarios import collapse

sys.path.insert(0, str(Path(__file__).parent))
from scenario_helpers import TINY, context  # noqa: E402

STEPS = 30
SETUP = replace(TINY, moe=collapse.SETUP.moe)


@pytest.fixture(scope="module")
def collapsed(module_store):
    return collapse.run(context(module_store, "col", steps=STEPS), setup=SETUP)


@pytest.fixture(scope="module")
def balanced(module_store):
    return collapse.run_balanced(context(module_store, "bal", steps=STEPS), setup=SETUP)


def test_planted_fault_is_flagged_at_its_layer_and_no_other(collapsed):
    table = collapsed.tables["planted: collapse detection"].set_index("layer")
    last = TINY.num_layers - 1
    assert table.loc[last, "verdict"] in collapse.FLAGGED
    assert not table.drop(index=last).verdict.isin(collapse.FLAGGED).any()
    assert collapsed.checks[f"expert {collapse.FAULT_EXPERT} is the one that took over"], collapsed.render()


def test_balanced_twin_is_not_flagged(balanced):
    table = balanced.tables["balanced: collapse detection"]
    assert not table.verdict.isin(collapse.FLAGGED).any(), balanced.render()


def test_the_layer_alert_fires_after_the_fault_on_the_planted_layer_only(collapsed, balanced):
    fault = f"the alert fires on layer {TINY.num_layers - 1} only, after the fault (step {STEPS // 2})"
    assert collapsed.checks[fault], collapsed.render()
    assert balanced.checks["the alert never fires"], balanced.render()
