"""The expert -> device map format: what a run records reads back the same, and contiguous is EP's default."""
from __future__ import annotations

import pytest

from moescope.device_map import contiguous, recorded, resolve


def test_a_recorded_map_reads_back_as_given():
    given = resolve({0: [0, [1, 2], 2], 3: [2, 1, 0], 9: [0, 0, 0]}, experts={0: 3, 3: 3})
    config = given.to_config()
    assert config == {"expert_devices": {"source": "given", "num_devices": 3,
                                         "layers": {"0": [0, [1, 2], 2], "3": [2, 1, 0]}}}
    assert recorded(config) == given
    assert recorded({}) is None and recorded(None) is None


def test_contiguous_puts_equal_blocks_on_each_device():
    assert contiguous(8, 4) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert resolve(ep_size=2, experts={5: 4}).layers == {5: [(0,), (0,), (1,), (1,)]}


def test_numpy_and_torch_maps_are_accepted():
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    assert resolve(np.array([0, 1]), experts={0: 2}).layers == resolve(torch.tensor([0, 1]), experts={0: 2}).layers
