"""Structural detection: routers recognised by what they do, with no adapter and no spec.

A user-written MoE (nn.Linear gate + torch.topk in its own forward, experts in a
ModuleList) must be recorded exactly as it routed: the model keeps what it applied in
`applied` purely so the test can compare; the probe never reads it.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from moescope.probe import attach
from moescope.probe.adapters import discover
from moescope.probe.adapters.structural import ExpertsInputAdapter, TopkTraceAdapter
from moescope.probe.adapters.watch import select_sites

D, E, K, V = 16, 4, 2, 64


class UserMoE(nn.Module):
    def __init__(self, softmax_after_topk: bool = False):
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D)) for _ in range(E))
        self.k, self.softmax_after_topk = K, softmax_after_topk
        self.applied: list = []

    def forward(self, x_BSD):
        x_TD = x_BSD.reshape(-1, D)
        logits_TE = self.gate(x_TD)
        if self.softmax_after_topk:
            top_TK, ids_TK = torch.topk(logits_TE, self.k, dim=-1)
            w_TK = top_TK.softmax(-1)
        else:
            w_TK, ids_TK = torch.topk(logits_TE.softmax(-1), self.k, dim=-1)
            w_TK = w_TK / w_TK.sum(-1, keepdim=True)
        self.applied.append((ids_TK.detach().clone(), w_TK.detach().clone()))
        out_TD = torch.zeros_like(x_TD)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(ids_TK == e)
            out_TD.index_add_(0, tok, expert(x_TD[tok]) * w_TK[tok, slot, None])
        return out_TD.reshape(x_BSD.shape)


class UserLM(nn.Module):
    def __init__(self, layers: int = 3, softmax_after_topk: bool = False):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.blocks = nn.ModuleList(UserMoE(softmax_after_topk) for _ in range(layers))
        self.head = nn.Linear(D, V)

    def forward(self, input_ids, attention_mask=None):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


class FusedExperts(nn.Module):
    """experts(hidden, top_k_index, top_k_weights) as transformers 5 builds them."""

    def __init__(self):
        super().__init__()
        self.num_experts = E
        self.w_EDD = nn.Parameter(torch.randn(E, D, D) * D ** -0.5)

    def forward(self, hidden_TD, top_k_index, top_k_weights):
        out_TD = torch.zeros_like(hidden_TD)
        for slot in range(top_k_index.shape[1]):
            w_TDD = self.w_EDD[top_k_index[:, slot]]
            out_TD += torch.einsum("td,tde->te", hidden_TD, w_TDD) * top_k_weights[:, slot, None]
        return out_TD


class SigmoidRouter(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, D))

    def forward(self, x_TD):
        scores_TE = torch.sigmoid(x_TD @ self.weight.T)
        w_TK, ids_TK = scores_TE.topk(K, dim=-1)
        return scores_TE, w_TK * 2.0, ids_TK


class FusedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.router, self.experts = SigmoidRouter(), FusedExperts()
        self.applied: list = []

    def forward(self, x_BSD):
        x_TD = x_BSD.reshape(-1, D)
        _, w_TK, ids_TK = self.router(x_TD)
        self.applied.append((ids_TK.clone(), w_TK.detach().clone()))
        return self.experts(x_TD, ids_TK, w_TK).reshape(x_BSD.shape)


class FusedLM(UserLM):
    def __init__(self, layers: int = 2):
        super().__init__(layers)
        self.blocks = nn.ModuleList(FusedBlock() for _ in range(layers))


def tokens():
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, V, (2, 5), generator=g)


def sorted_pair(ids_TK, w_TK):
    order = torch.argsort(w_TK, dim=-1, descending=True, stable=True)
    return ids_TK.gather(-1, order), w_TK.gather(-1, order).float()


def recorded(probe, layer):
    routing = probe.tables()["routing"].to_pandas()
    rows = routing[routing.layer == layer].sort_values(["seq", "pos", "slot"])
    ids = torch.tensor(rows.expert.to_numpy()).reshape(-1, K)
    weights = torch.tensor(rows.weight.to_numpy()).reshape(-1, K)
    return ids, weights


def probe_and_compare(model):
    """Output bit-identical with the probe, and every block's record equal to what it applied."""
    ids = tokens()
    with torch.no_grad():
        plain = model(ids)
    for block in model.blocks:
        block.applied.clear()
    with attach(model, sink="memory", run="structural") as probe, torch.no_grad():
        out = model(ids)
    assert torch.equal(plain, out)
    for i, block in enumerate(model.blocks):
        (applied,) = block.applied
        exp_ids, exp_w = sorted_pair(*applied)
        got_ids, got_w = recorded(probe, i)
        assert torch.equal(got_ids.long(), exp_ids)
        torch.testing.assert_close(got_w, exp_w, rtol=0, atol=0)
    return probe


@pytest.mark.parametrize("softmax_after_topk", [False, True], ids=["softmax-topk-renorm", "topk-softmax"])
def test_user_linear_and_topk_router_is_recorded_as_the_model_routed(softmax_after_topk):
    torch.manual_seed(0)
    model = UserLM(softmax_after_topk=softmax_after_topk).eval()
    pairs = discover(model)
    assert [(type(a).__name__, s.module_path, s.layer, s.num_experts) for a, s in pairs] == [
        ("TopkTraceAdapter", f"blocks.{i}.gate", i, E) for i in range(3)]
    probe = probe_and_compare(model)
    assert probe.stats()["failures"] == 0


def test_experts_called_with_ids_and_weights_record_what_they_received_and_find_the_router():
    torch.manual_seed(0)
    model = FusedLM().eval()
    pairs = discover(model)
    assert [(type(a).__name__, s.module_path, s.hook_module_path, s.top_k) for a, s in pairs] == [
        ("ExpertsInputAdapter", f"blocks.{i}.router", f"blocks.{i}.experts", 0) for i in range(2)]
    probe = probe_and_compare(model)  # the doubled weights, as applied
    # The router's (T, E) scores feed the distribution: entropy is recorded and finite.
    stats = probe.tables()["token_stats"].to_pandas()
    assert len(stats) == 2 * tokens().numel() and stats.entropy.notna().all()


def test_a_width_e_head_next_to_e_blocks_without_topk_is_not_a_router():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(D, D) for _ in range(2))
            self.head = nn.Linear(D, 2)

        def forward(self, x):
            return self.head(self.blocks[1](self.blocks[0](x)))

    assert TopkTraceAdapter().sites(Plain()) == [] and ExpertsInputAdapter().sites(Plain()) == []


def test_watch_keeps_layers_globs_or_predicate_and_rejects_a_filter_matching_nothing():
    model = UserLM(layers=4)
    pairs = discover(model)
    assert [s.layer for _, s in select_sites(pairs, [1, 3])] == [1, 3]
    assert [s.layer for _, s in select_sites(pairs, "blocks.2.*")] == [2]
    assert [s.layer for _, s in select_sites(pairs, lambda s: s.layer >= 2)] == [2, 3]
    with pytest.raises(ValueError, match=r"watch=\[9\] matches none of the 4 routers found"):
        select_sites(pairs, [9])
    with pytest.raises(ValueError, match="watch must be layer numbers"):
        select_sites(pairs, 1.5)
    ids = tokens()
    with attach(model, sink="memory", run="watched", watch=[0, 2]) as probe, torch.no_grad():
        model(ids)
    assert sorted(set(probe.tables()["routing"].column("layer").to_pylist())) == [0, 2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_capture_of_a_probed_model_is_refused_with_one_line():
    from moescope.probe.attach import CudaGraphCaptureError

    torch.manual_seed(0)
    model = FusedLM().cuda().eval()
    ids = tokens().cuda()
    with attach(model, sink="memory", run="graphs") as probe, torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model(ids)  # warm-up, recorded eagerly
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with pytest.raises(CudaGraphCaptureError) as err:
            with torch.cuda.graph(graph):
                model(ids)
    message = str(err.value)
    assert "\n" not in message and "CUDA graph" in message and "detach()" in message
    assert sorted(set(probe.tables()["routing"].column("layer").to_pylist())) == [0, 1]
