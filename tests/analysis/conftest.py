"""Fixtures for the analysis tests: a store holding run "synth" with known routing."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from synth_runs import E, synth_steps, write_run  # noqa: E402


@pytest.fixture
def synth(store):
    """Run "synth": 4 steps (0, 10, 20, 30); layer 0 uniform (E=8, K=2), layer 1 collapsed (E=8, K=1), layer 2 random."""
    steps = synth_steps()
    write_run(store, "synth", steps, {0: (E, 2), 1: (E, 1), 2: (E, 2)}, checkpoints=[("c0", 0)])
    return store, steps
