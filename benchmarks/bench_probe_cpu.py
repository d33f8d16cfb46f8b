"""Probe overhead on CPU: unprobed vs probed (full capture, discarding sink) vs a naive hook.

Legend: B sequences, S positions, T = B*S tokens, D hidden, E experts, K top-k.

    python benchmarks/bench_probe_cpu.py [--layers 4 --hidden 256 --ffn 512 --experts 8 --batch 8 --seq 256]

Uses the bundled reference MoETransformer when it is importable, otherwise a
reference-like MoE transformer defined here (attention + token-dispatch top-k MoE).
Modes run interleaved for --repeats rounds; the ratio is of medians.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from moescope.probe import NullSink, attach
from moescope.probe.adapters.base import RouterCapture, RouterSite


class MoE(nn.Module):
    def __init__(self, d, f, e, k):
        super().__init__()
        self.gate = nn.Linear(d, e, bias=False)
        self.w1 = nn.Parameter(torch.randn(e, d, f) * d ** -0.5)
        self.w2 = nn.Parameter(torch.randn(e, f, d) * f ** -0.5)
        self.e, self.k = e, k
        self.last = None

    def forward(self, x_TD):
        logits_TE = self.gate(x_TD)
        probs_TE = logits_TE.softmax(-1)
        w_TK, ids_TK = probs_TE.topk(self.k, -1)
        w_TK = w_TK / w_TK.sum(-1, keepdim=True)
        order = ids_TK.reshape(-1).argsort()
        counts = torch.bincount(ids_TK.reshape(-1), minlength=self.e).tolist()  # the model's own dispatch
        tok = order // self.k
        out_TD = torch.zeros_like(x_TD)
        start = 0
        for e, n in enumerate(counts):
            idx = tok[start:start + n]
            h = F.silu(x_TD[idx] @ self.w1[e]) @ self.w2[e]
            out_TD.index_add_(0, idx, h * w_TK.reshape(-1)[order[start:start + n], None])
            start += n
        self.last = (logits_TE, probs_TE, ids_TK, w_TK)
        return out_TD


class Block(nn.Module):
    def __init__(self, d, f, e, k, heads=4):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.heads = heads
        self.mlp = MoE(d, f, e, k)

    def forward(self, x_BSD):
        b, s, d = x_BSD.shape
        q, k, v = self.qkv(self.n1(x_BSD)).reshape(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x_BSD = x_BSD + self.o(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, d))
        return x_BSD + self.mlp(self.n2(x_BSD).reshape(-1, d)).reshape(b, s, d)


class LocalLM(nn.Module):
    def __init__(self, vocab, d, f, e, k, layers):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d, f, e, k) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask=None):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class LocalAdapter:
    name = "bench"

    def sites(self, model):
        return [RouterSite(f"layers.{i}.mlp", i, b.mlp.e, b.mlp.k, "softmax-topk") for i, b in enumerate(model.layers)]

    def capture(self, site, module, args, kwargs, output):
        logits_TE, probs_TE, ids_TK, w_TK = module.last
        return RouterCapture(probs_TE=probs_TE, expert_ids_TK=ids_TK, weights_TK=w_TK, logits_TE=logits_TE)


def build(args):
    try:
        from moescope.kernels import MoEConfig, ModelConfig, MoETransformer

        cfg = ModelConfig(vocab_size=256, hidden_size=args.hidden, num_layers=args.layers, num_heads=4, ffn_size=args.ffn,
                          max_seq_len=args.seq, moe=MoEConfig(num_experts=args.experts, top_k=args.top_k, score="softmax"),
                          backend="torch")
        return MoETransformer.from_config(cfg, seed=0), None, "moescope.kernels.MoETransformer"
    except Exception:  # noqa: BLE001 - reference model absent or different: use the local one
        torch.manual_seed(0)
        model = LocalLM(256, args.hidden, args.ffn, args.experts, args.top_k, args.layers)
        adapter = LocalAdapter()
        return model, [(adapter, s) for s in adapter.sites(model)], "local reference-like MoE"


class NaiveHook:
    """What people write first: copy router outputs to host numpy on every call."""

    def __init__(self, model, sites):
        self.rows = []
        self.handles = []
        for adapter, site in sites:
            mod = model.get_submodule(site.hook_module_path or site.module_path)
            self.handles.append(mod.register_forward_hook(self._hook(adapter, site), with_kwargs=True))

    def _hook(self, adapter, site):
        def hook(module, args, kwargs, output):
            cap = adapter.capture(site, module, args, kwargs, output)
            p = cap.probs_TE.detach().cpu().numpy()
            self.rows.append((cap.expert_ids_TK.cpu().numpy().copy(), cap.weights_TK.detach().cpu().numpy().copy(),
                              -(p * np.log(np.maximum(p, 1e-30))).sum(-1)))
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--iters", type=int, default=5, help="forwards per timed block")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    model, sites, label = build(args)
    if sites is None:
        from moescope.probe.adapters import discover

        sites = discover(model)
    model.eval()
    ids = torch.randint(0, 256, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    times = {"unprobed": [], "probed": [], "naive": []}
    host_us = []

    def block():
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(args.iters):
                model(ids, attention_mask=mask)
        return (time.perf_counter() - t0) / args.iters

    block()  # warm-up
    for _ in range(args.repeats):
        times["unprobed"].append(block())
        probe = attach(model, sink=NullSink(), run="bench", sites=sites)
        block()
        probe.stats()
        times["probed"].append(block())
        host_us.append(probe.stats()["host_us_per_layer"])
        probe.detach()
        naive = NaiveHook(model, sites)
        times["naive"].append(block())
        naive.remove()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model: {label}; L={args.layers} D={args.hidden} F={args.ffn} E={args.experts} K={args.top_k} "
          f"tokens/forward={args.batch * args.seq}; torch threads={torch.get_num_threads()}")
    for k in ("unprobed", "probed", "naive"):
        print(f"{k:9s} median {med[k] * 1e3:8.2f} ms/forward  ratio {med[k] / med['unprobed']:.3f}x")
    print(f"probe host time in router hooks: {statistics.median(host_us):.1f} us per MoE layer per forward")


if __name__ == "__main__":
    main()
