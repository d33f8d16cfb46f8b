"""A recorded run that also recorded where its experts live, as attach(..., expert_devices=...) records it."""
from __future__ import annotations

import dataclasses

import numpy as np

from .conftest import STEPS, make_frame

EP_RUN = "synthetic-ep"
# Layer 0 contiguous over 2 devices; layer 1 alternating, expert 2 replicated on both.
EP_MAP = {"source": "given", "num_devices": 2, "layers": {"0": [0, 0, 1, 1], "1": [0, 1, [0, 1], 1]}}


def add_ep_run(store, run: str = EP_RUN, seed: int = 3):
    rng = np.random.default_rng(seed)
    for step in range(STEPS):
        frame = make_frame(step, rng, run=run, producer=f"p0-{run}")
        if step == 0:  # the probe's first frame carries the run's config
            frame = dataclasses.replace(frame, meta={**frame.meta, "run_config": {"expert_devices": EP_MAP}})
        assert store.write_frame(frame)
    return store
