"""DeepSpeed TopKGate: captured experts and gates equal its combine/dispatch tensors; drops marked."""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("deepspeed.moe.sharded_moe")
from deepspeed.moe.sharded_moe import TopKGate  # noqa: E402

from moescope.probe.adapters import discover  # noqa: E402


class GateStack(nn.Module):
    def __init__(self, k, capacity_factor):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(
            TopKGate(16, 4, k=k, capacity_factor=capacity_factor, eval_capacity_factor=capacity_factor, min_capacity=1)
            for _ in range(2)
        )

    def forward(self, x):
        return [layer(x) for layer in self.layers]


@pytest.mark.parametrize("k", [1, 2])
def test_deepspeed_gate_capture_matches_combine_weights_and_marks_drops(k):
    model = GateStack(k, capacity_factor=0.5).eval()
    pairs = discover(model)
    assert [(s.module_path, s.top_k, s.layer) for _, s in pairs] == [("layers.0", k, 0), ("layers.1", k, 1)]
    x = torch.randn(12, 16, generator=torch.Generator().manual_seed(5))
    captures, handles = {}, []
    for adapter, site in pairs:
        def hook(mod, args, kwargs, output, adapter=adapter, site=site):
            captures[site.module_path] = adapter.capture(site, mod, args, kwargs, output)

        handles.append(model.get_submodule(site.module_path).register_forward_hook(hook, with_kwargs=True))
    with torch.no_grad():
        outs = model(x)
    for h in handles:
        h.remove()
    for (_, site), (_, combine_TEC, dispatch_TEC, _) in zip(pairs, outs):
        cap = captures[site.module_path]
        combine_TE = combine_TEC.sum(-1)
        rebuilt_TE = torch.zeros_like(combine_TE).scatter_add(1, cap.expert_ids_TK, cap.weights_TK)
        torch.testing.assert_close(rebuilt_TE, combine_TE, rtol=0, atol=0)
        kept_TE = torch.zeros(12, 4, dtype=torch.bool).scatter(1, cap.expert_ids_TK, ~cap.dropped_TK)
        assert torch.equal(kept_TE, dispatch_TEC.any(-1))
        assert bool(cap.dropped_TK.any())  # capacity 0.5 must drop something
        # The top-1 slot names the router's argmax whether kept or dropped.
        assert bool((cap.expert_ids_TK == cap.logits_TE.argmax(-1, keepdim=True)).any(-1).all())
