"""A tiny MoE language model and its adapter, for probe tests that must not depend on
any particular model family. Legend: B sequences, S positions, T = B*S, D hidden,
E experts, K slots, V vocabulary.

The MoE block keeps what it decided (`last`) so the adapter reads exactly what ran,
including capacity drops (Switch-style: a slot beyond an expert's capacity is dropped).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from moescope.probe.adapters.base import RouterCapture, RouterSite


class FakeMoE(nn.Module):
    def __init__(self, d: int, e: int, k: int, capacity_factor: float | None = None):
        super().__init__()
        self.router = nn.Linear(d, e, bias=False)
        self.experts = nn.ModuleList(nn.Linear(d, d) for _ in range(e))
        self.e, self.k, self.capacity_factor = e, k, capacity_factor
        self.last = None

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        b, s, d = x_BSD.shape
        x_TD = x_BSD.reshape(-1, d)
        logits_TE = self.router(x_TD)
        probs_TE = logits_TE.softmax(-1)
        weights_TK, ids_TK = probs_TE.topk(self.k, dim=-1)
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        dropped_TK = None
        if self.capacity_factor is not None:
            capacity = math.ceil(x_TD.shape[0] * self.k / self.e * self.capacity_factor)
            onehot_TKE = nn.functional.one_hot(ids_TK, self.e)
            rank_TKE = onehot_TKE.reshape(-1, self.e).cumsum(0).reshape(onehot_TKE.shape) * onehot_TKE
            dropped_TK = rank_TKE.sum(-1) > capacity
        keep_TK = weights_TK if dropped_TK is None else weights_TK * (~dropped_TK)
        out_TD = torch.zeros_like(x_TD)
        for e, expert in enumerate(self.experts):
            gate_T = (keep_TK * (ids_TK == e)).sum(-1, keepdim=True)
            out_TD = out_TD + gate_T * expert(x_TD)
        self.last = (logits_TE, ids_TK, weights_TK, dropped_TK)
        return out_TD.reshape(b, s, d)


class FakeBlock(nn.Module):
    def __init__(self, d, e, k, capacity_factor):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.moe = FakeMoE(d, e, k, capacity_factor)

    def forward(self, x):
        return x + self.moe(self.norm(x))


class FakeLM(nn.Module):
    def __init__(self, vocab=50, d=16, e=4, k=2, layers=2, capacity_factor=None, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(FakeBlock(d, e, k, capacity_factor) for _ in range(layers))
        self.head = nn.Linear(d, vocab)
        self.e, self.k = e, k

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None):
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        for layer in self.layers:
            x = layer(x)
        logits = self.head(x)
        if labels is not None:
            return {"loss": nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)),
                    "logits": logits}
        return logits

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens=3):
        """Greedy decoding the way HF does it: prefill, then one token per call, the mask growing."""
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        out = input_ids
        step_ids = input_ids
        for _ in range(max_new_tokens):
            logits = self(step_ids, attention_mask=mask)
            step_ids = logits[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, step_ids], 1)
            mask = torch.cat([mask, torch.ones_like(step_ids)], 1)
        return out


class FakeAdapter:
    name = "fake"

    def sites(self, model: FakeLM) -> list[RouterSite]:
        return [RouterSite(module_path=f"layers.{i}.moe", layer=i, num_experts=model.e, top_k=model.k,
                           router_kind="softmax-topk", capacity_factor=blk.moe.capacity_factor)
                for i, blk in enumerate(model.layers)]

    def capture(self, site, module, args, kwargs, output):
        logits_TE, ids_TK, weights_TK, dropped_TK = module.last
        return RouterCapture(probs_TE=logits_TE.softmax(-1), expert_ids_TK=ids_TK, weights_TK=weights_TK,
                             logits_TE=logits_TE, dropped_TK=dropped_TK)


def fake_sites(model: FakeLM, adapter=None):
    adapter = adapter or FakeAdapter()
    return [(adapter, site) for site in adapter.sites(model)]


def batch(b=3, s=7, vocab=50, seed=1, pad_right=(0, 2, 4)):
    """Token ids and a right-padded mask: sequence i has pad_right[i] padding positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    for i, p in enumerate(pad_right[:b]):
        if p:
            mask[i, s - p:] = 0
            ids[i, s - p:] = 0
    return ids, mask
