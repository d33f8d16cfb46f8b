"""discover(), NoRouterFound, declared routers (RouterSpec) and torchtitan-style routers."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moescope.probe.adapters import NoRouterFound, RouterSpec, discover
from moescope.probe.adapters.torchtitan import TorchTitanAdapter


class TinyGatedMoE(nn.Module):
    """A hand-written top-2 softmax MoE whose router is a bare Linear (found by structure, or declared)."""

    def __init__(self, dim=16, experts=4, top_k=2):
        super().__init__()
        self.gate = nn.Linear(dim, experts, bias=False)
        self.experts = nn.ModuleList(nn.Linear(dim, dim) for _ in range(experts))
        self.top_k = top_k

    def forward(self, x):
        probs = torch.softmax(self.gate(x).float(), -1)
        w, idx = probs.topk(self.top_k, -1)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for slot in range(self.top_k):
            for e, expert in enumerate(self.experts):
                out = out + (idx[..., slot] == e).unsqueeze(-1) * w[..., slot : slot + 1] * expert(x)
        return out


class TinyModel(nn.Module):
    def __init__(self, block, n=2):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(block() for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def hook_all(model, pairs):
    captures, handles = {}, []
    for adapter, site in pairs:
        def hook(mod, args, kwargs, output, adapter=adapter, site=site):
            captures[site.module_path] = adapter.capture(site, mod, args, kwargs, output)

        handles.append(model.get_submodule(site.hook_module_path or site.module_path).register_forward_hook(hook, with_kwargs=True))
    return captures, handles


class TinyDenseMoE(TinyGatedMoE):
    """Every expert on every token, softmax-weighted: no top-k, so nothing routes."""

    def forward(self, x):
        probs = torch.softmax(self.gate(x).float(), -1)
        return sum(probs[..., e : e + 1] * expert(x) for e, expert in enumerate(self.experts))


def test_discover_without_router_raises_one_line_with_classes_and_spec_hint():
    model = TinyModel(TinyDenseMoE)
    with pytest.raises(NoRouterFound) as err:
        discover(model)
    message = str(err.value)
    assert "\n" not in message
    assert message.index("TinyDenseMoE") < message.index("Linear")  # MoE-looking classes first
    assert "spec=RouterSpec(" in message
    assert isinstance(err.value, ValueError)


def test_declared_softmax_router_matches_the_blocks_own_routing():
    model = TinyModel(TinyGatedMoE)
    pairs = discover(model, spec=RouterSpec(module="layers.*.gate", num_experts=4, top_k=2, rule="softmax-topk"))
    assert [(s.module_path, s.layer) for _, s in pairs] == [("layers.0.gate", 0), ("layers.1.gate", 1)]
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2))
    plain = model(x)
    captures, handles = hook_all(model, pairs)
    out = model(x)
    for h in handles:
        h.remove()
    assert torch.equal(plain, out)
    h = x
    for i, layer in enumerate(model.layers):
        probs = torch.softmax(layer.gate(h).float(), -1).reshape(-1, 4)
        w, idx = probs.topk(2, -1)
        cap = captures[f"layers.{i}.gate"]
        assert torch.equal(cap.expert_ids_TK, idx)
        torch.testing.assert_close(cap.weights_TK, w / w.sum(-1, keepdim=True))
        torch.testing.assert_close(cap.probs_TE, probs)
        h = h + layer(h)


def test_declared_regex_and_sigmoid_rule():
    model = TinyModel(TinyGatedMoE)
    pairs = discover(model, spec=RouterSpec(module=r"re:layers\.[01]\.gate", num_experts=4, top_k=1, rule="sigmoid-topk"))
    assert len(pairs) == 2
    adapter, site = pairs[0]
    logits = torch.tensor([[0.0, 2.0, -1.0, 1.0]])
    cap = adapter.capture(site, model.layers[0].gate, (), {}, logits)
    assert cap.expert_ids_TK.tolist() == [[1]]
    torch.testing.assert_close(cap.weights_TK, torch.ones(1, 1))
    torch.testing.assert_close(cap.probs_TE.sum(-1), torch.ones(1))


def test_declared_topk_softmax_rule_softmaxes_only_the_kept_logits():
    model = TinyModel(TinyGatedMoE)
    adapter, site = discover(model, spec=RouterSpec(module="layers.0.gate", num_experts=4, top_k=2, rule="topk-softmax"))[0]
    cap = adapter.capture(site, model.layers[0].gate, (), {}, torch.tensor([[3.0, 1.0, 0.0, 2.0]]))
    assert cap.expert_ids_TK.tolist() == [[0, 3]]
    torch.testing.assert_close(cap.weights_TK, torch.softmax(torch.tensor([[3.0, 2.0]]), -1))


@pytest.mark.parametrize(
    "spec, words",
    [
        (dict(module="layers.*.gate", num_experts=8, top_k=2), "not num_experts=8"),
        (dict(module="layers.*.router", num_experts=4, top_k=2), "matches no module"),
        (dict(module="layers.*.experts.0", num_experts=4, top_k=2), "16 outputs, not num_experts=4"),
    ],
)
def test_declared_spec_that_does_not_fit_the_model_is_refused_at_discover(spec, words):
    model = TinyModel(TinyGatedMoE)
    with pytest.raises(ValueError, match=words) as err:
        discover(model, spec=RouterSpec(**spec))
    assert "\n" not in str(err.value)


def test_router_spec_rejects_unknown_rule_and_impossible_top_k():
    with pytest.raises(ValueError, match="rule"):
        RouterSpec(module="x", num_experts=4, top_k=2, rule="argmax")
    with pytest.raises(ValueError, match="top_k"):
        RouterSpec(module="x", num_experts=4, top_k=5)


class TokenChoiceTopKRouter(nn.Module):
    """Written from torchtitan's documented interface (models/moe/moe.py)."""

    def __init__(self, dim, num_experts, top_k, score_func="sigmoid", route_norm=True, route_scale=2.0):
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.num_experts, self.top_k = num_experts, top_k
        self.score_func, self.route_norm, self.route_scale = score_func, route_norm, route_scale

    def forward(self, x, expert_bias=None):
        scores = self.gate(x)
        scores = torch.sigmoid(scores.float()) if self.score_func == "sigmoid" else F.softmax(scores.float(), dim=1)
        if expert_bias is not None:
            _, idx = torch.topk(scores + expert_bias, k=self.top_k, dim=1)
            top = scores.gather(1, idx)
        else:
            top, idx = torch.topk(scores, k=self.top_k, dim=1)
        if self.route_norm:
            top = top / (top.sum(-1, keepdim=True) + 1e-20)
        top = top * self.route_scale
        counts = torch.histc(idx.view(-1).float(), bins=self.num_experts, min=0, max=self.num_experts)
        return top, idx, counts


class TitanMoE(nn.Module):
    def __init__(self, dim=16, experts=8, top_k=2):
        super().__init__()
        self.router = TokenChoiceTopKRouter(dim, experts, top_k)
        self.experts_w = nn.Parameter(torch.randn(experts, dim, dim) * 0.1)
        self.register_buffer("expert_bias", torch.linspace(-0.3, 0.3, experts))

    def forward(self, x):
        b, s, d = x.shape
        flat = x.reshape(-1, d)
        top, idx, _ = self.router(flat, self.expert_bias)
        y = torch.einsum("td,tkde->tke", flat, self.experts_w[idx])
        return (y * top.unsqueeze(-1)).sum(1).reshape(b, s, d)


def test_torchtitan_style_router_detected_by_interface_and_records_applied_scores():
    model = TinyModel(TitanMoE)
    pairs = discover(model)
    assert [(type(a), s.module_path, s.router_kind) for a, s in pairs] == [
        (TorchTitanAdapter, "layers.0.router", "sigmoid-topk"), (TorchTitanAdapter, "layers.1.router", "sigmoid-topk")]
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(4))
    plain = model(x)
    truth, handles = {}, []
    for i, layer in enumerate(model.layers):
        handles.append(layer.router.register_forward_hook(lambda m, a, o, i=i: truth.__setitem__(i, o)))
    captures, more = hook_all(model, pairs)
    out = model(x)
    for h in handles + more:
        h.remove()
    assert torch.equal(plain, out)
    for i in range(2):
        top, idx, _ = truth[i]
        cap = captures[f"layers.{i}.router"]
        order = torch.argsort(top, dim=-1, descending=True, stable=True)
        assert torch.equal(cap.expert_ids_TK, idx.gather(1, order))
        torch.testing.assert_close(cap.weights_TK, top.gather(1, order), rtol=0, atol=0)
        torch.testing.assert_close(cap.weights_TK.sum(-1), torch.full((6,), 2.0))
        torch.testing.assert_close(cap.probs_TE.sum(-1), torch.ones(6))
