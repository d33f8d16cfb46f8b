"""Probe overhead on a GPU: a training step and a decode step of a transformers Mixtral,
unprobed vs moescope (full capture) vs a naive hook that copies router outputs to the
CPU vs moewatch (PyPI, when installed), interleaved in one process; plus the no-host-sync
check under torch.cuda.set_sync_debug_mode("error").

    python benchmarks/bench_probe_gpu.py [--layers 8 --hidden 1024 --experts 8 --batch 8 --seq 1024]
    python benchmarks/bench_probe_gpu.py --device cpu --layers 2 --hidden 64 --seq 32 --repeats 2   # smoke run

Budgets (BENCHMARKS.md): ≤1% of a training step and ≤3% of a decode step at full capture.
Random weights built from a config; nothing is downloaded.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def build(args):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.hidden * 7 // 2,
                        num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 128),
                        num_key_value_heads=max(1, args.hidden // 512), num_local_experts=args.experts,
                        num_experts_per_tok=args.top_k, max_position_embeddings=args.seq + 64)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    return MixtralForCausalLM(cfg).to(device=args.device, dtype=dtype)


class NaiveHook:
    """What a quick observer does: copy each router call to the CPU (a host sync per call)."""

    def __init__(self, model):
        from moescope.probe.adapters import discover

        self.rows, self.handles = [], []
        for adapter, site in discover(model):
            module = model.get_submodule(site.hook_module_path or site.module_path)
            self.handles.append(module.register_forward_hook(self._hook(adapter, site), with_kwargs=True))

    def _hook(self, adapter, site):
        def hook(module, args, kwargs, output):
            cap = adapter.capture(site, module, args, kwargs, output)
            self.rows.append((cap.expert_ids_TK.cpu(), cap.weights_TK.float().cpu(), cap.probs_TE.float().cpu()))
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()
        self.rows.clear()


def timer(device):
    if device == "cuda":
        def run(fn, iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3 / iters
    else:
        def run(fn, iters):
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            return (time.perf_counter() - t0) / iters
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("No CUDA device: no GPU timings measured or reported (use --device cpu for a smoke run).")
        return 0

    from moescope.probe import NullSink, attach

    model = build(args)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32000, (args.batch, args.seq), generator=gen).to(args.device)
    mask = torch.ones_like(ids)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def train_step():
        model.train()
        loss = model(ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # Decode: one new token per sequence against a prefilled KV cache of length seq.
    model.eval()
    with torch.no_grad():
        prefill = model(ids, attention_mask=mask, use_cache=True)
    cache = prefill.past_key_values
    next_ids = prefill.logits[:, -1:].argmax(-1)
    decode_mask = torch.ones(args.batch, args.seq + 1, dtype=mask.dtype, device=args.device)
    cache_len = args.seq

    def decode_step():
        with torch.no_grad():
            model(next_ids, attention_mask=decode_mask, past_key_values=cache, use_cache=True,
                  cache_position=torch.tensor([cache_len], device=args.device))
        if hasattr(cache, "crop"):
            cache.crop(-1)  # drop the token just appended: every timed decode sees the same length

    observers = {"unprobed": None}

    def moescope_on():
        return attach(model, sink=NullSink(), run="bench-gpu")

    observers["moescope"] = moescope_on
    observers["naive"] = lambda: NaiveHook(model)
    try:
        from moewatch import MoEWatch

        def moewatch_on():
            w = MoEWatch(model)
            w.start()
            return w
        observers["moewatch"] = moewatch_on
    except ImportError:
        print("moewatch not installed: `pip install moewatch==0.1.0` to include it")

    def stop(obs):
        if obs is None:
            return
        for name in ("detach", "remove", "stop"):
            if hasattr(obs, name):
                getattr(obs, name)()
                return

    run = timer(args.device)
    results = {phase: {name: [] for name in observers} for phase in ("train", "decode")}
    for phase, fn in (("train", train_step), ("decode", decode_step)):
        fn()  # warm-up
        for _ in range(args.repeats):
            for name, make in observers.items():
                obs = make() if make else None
                try:
                    fn()
                    results[phase][name].append(run(fn, args.iters))
                finally:
                    stop(obs)

    print(f"device: {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}; Mixtral L={args.layers} "
          f"D={args.hidden} E={args.experts} K={args.top_k}; train tokens/step={args.batch * args.seq}, "
          f"decode tokens/step={args.batch} at context {args.seq}")
    for phase, by_name in results.items():
        base = statistics.median(by_name["unprobed"])
        for name, times in by_name.items():
            med = statistics.median(times)
            print(f"{phase:6s} {name:9s} {med * 1e3:9.3f} ms/step  overhead {100 * (med / base - 1):+6.2f}%")

    if args.device == "cuda":
        probe = attach(model, sink=NullSink(), run="bench-gpu-sync")
        try:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                with torch.no_grad():
                    model(ids, attention_mask=mask)
                print("no-host-sync check: probed forward passed set_sync_debug_mode('error')")
            except RuntimeError as exc:
                print(f"no-host-sync check FAILED: {str(exc).splitlines()[0]}")
            finally:
                torch.cuda.set_sync_debug_mode(0)
        finally:
            probe.detach()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
