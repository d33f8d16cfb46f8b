"""DeepSpeed TopKGate: captured experts and gates equal its combine/dispatch tensors, or (inside its MoE layer)
its sparse routes; drops marked."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
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


class MoEStack(nn.Module):
    """DeepSpeed's own MoE layers (ep_size 1, no process group needed): MOELayer calls its gate with sparse_routes."""

    def __init__(self, k, **gate):
        super().__init__()
        from deepspeed.moe.layer import MoE

        torch.manual_seed(0)
        self.layers = nn.ModuleList(
            MoE(hidden_size=16, expert=nn.Linear(16, 16), num_experts=4, ep_size=1, k=k, capacity_factor=0.5,
                eval_capacity_factor=0.5, min_capacity=1, **gate)
            for _ in range(2)
        )

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)[0]
        return x


@pytest.mark.parametrize("k, gate", [(1, {}), (2, {}), (2, {"top2_2nd_expert_sampling": False}), (3, {})])
def test_deepspeed_moe_layer_routing_rows_are_the_gates_sparse_routes(k, gate):
    pytest.importorskip("deepspeed.moe.layer")
    from moescope.probe import attach

    model = MoEStack(k, **gate).eval()
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(5))

    def forward():
        torch.manual_seed(1)  # random token selection and top-2 sampling draw from the global generator
        with torch.no_grad():
            return model(x)

    ref = forward()
    seen = []  # (gate input, indices_KT, gates_KT) per layer, as the gate returned them
    handles = [layer.deepspeed_moe.gate.register_forward_hook(
        lambda mod, args, out: seen.append((args[0], out[3], out[5]))) for layer in model.layers]
    with attach(model, sink="memory", run="ds-moe") as probe:
        out = forward()
    for h in handles:
        h.remove()
    assert torch.equal(ref, out)
    assert probe.stats()["failures"] == 0
    routing = probe.tables()["routing"].to_pandas()
    assert len(seen) == 2 and len(routing) == 2 * 12 * k  # every slot of every token, dropped ones too
    for layer, (x_TD, indices_KT, gates_KT) in enumerate(seen):
        rows = routing[routing.layer == layer]
        token = (rows.seq * 6 + rows.pos).to_numpy()
        kept = rows[~rows.dropped]
        want = sorted((t, int(e), float(w)) for s in range(k) for t, (e, w) in enumerate(zip(indices_KT[s], gates_KT[s]))
                      if e >= 0)
        got = sorted(zip(token[~rows.dropped.to_numpy()].tolist(), kept.expert.tolist(), kept.weight.tolist()))
        assert got == want
        assert bool((rows[rows.dropped].weight == 0).all())
        want_drops = (indices_KT < 0).sum(0)
        assert sorted(token[rows.dropped.to_numpy()].tolist()) == [t for t in range(12) for _ in range(int(want_drops[t]))]
        assert int(want_drops.sum()) > 0  # capacity 0.5 must drop something
        # Dropped slots name the experts the gate chose, its top-k by logit; a sampled 2nd top-2 slot cannot
        # be recovered once dropped, but the first slot (the argmax) always is.
        topk_TK = F.linear(x_TD, model.layers[layer].deepspeed_moe.gate.wg.weight).topk(k, dim=-1).indices
        chosen = set(zip(token.tolist(), rows.expert.tolist()))
        assert len(chosen) == len(rows)  # no expert twice for one token
        assert {(t, int(topk_TK[t, 0])) for t in range(12)} <= chosen
        if k != 2 or gate.get("top2_2nd_expert_sampling") is False:
            assert chosen == {(t, int(e)) for t in range(12) for e in topk_TK[t]}
