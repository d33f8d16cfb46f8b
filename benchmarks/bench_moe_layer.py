"""Whole MoE layer (router through combine), Triton backend vs a per-expert torch loop vs
torch._grouped_mm, in one process, forward only, bf16.

Legend: T tokens, D hidden, F ffn, E experts, K top-k, N kept (token, slot) assignments.

    python benchmarks/bench_moe_layer.py [--tokens 1 64 1024 16384] [--shapes mixtral fine]
                                         [--repeats 20 --warmup 5]

Shapes: "mixtral" E=8 top-2 D=4096 F=14336; "fine" E=128 top-8 D=4096 F=768 (+1 shared
expert). Reports median time, TFLOP/s, bytes/s and the fraction of the H100 SXM roofline
(3.35 TB/s, 989 bf16 TFLOP/s dense): roofline time = max(FLOPs / peak, bytes / bandwidth),
fraction = roofline time / measured time. Bytes count the unavoidable traffic only: the
weights of experts that receive at least one token, x read, y written, the router weight.

Without a CUDA device no GPU number exists to report: the script says so, runs a tiny
correctness sanity check of the three paths on the Triton CPU interpreter, and exits 0.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the @triton.jit definitions

from moescope.kernels.config import MoEConfig  # noqa: E402
from moescope.kernels.experts import experts_forward, swiglu  # noqa: E402
from moescope.kernels.params import MoEParams  # noqa: E402
from moescope.kernels.routing import route  # noqa: E402

PEAK_TFLOPS = 989.0  # H100 SXM bf16 dense
PEAK_BYTES_PER_S = 3.35e12  # H100 SXM HBM3
SHAPES = {
    "mixtral": dict(cfg=MoEConfig.mixtral(num_experts=8), D=4096, F=14336),
    "fine": dict(cfg=MoEConfig.deepseek(num_experts=128, top_k=8, shared=1), D=4096, F=768),
}


def grouped_mm_layer(x_TD, params, cfg):
    """Torch baseline: torch router, sort by expert, torch._grouped_mm for the three GEMMs."""
    routing = route(x_TD, params, cfg)
    T, K = routing.expert_ids_TK.shape
    E = cfg.num_experts
    keep_TK = (routing.expert_ids_TK >= 0) & ~routing.dropped_TK
    key_N = torch.where(keep_TK, routing.expert_ids_TK, E).reshape(-1)
    order_N = torch.argsort(key_N, stable=True)
    counts_E = torch.bincount(key_N, minlength=E + 1)[:E]
    offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
    n_kept = int(offs_E[-1])  # host sync, as any torch grouped path needs for the shapes
    sel_N = order_N[:n_kept]
    tok_N = sel_N // K
    xs_ND = x_TD[tok_N]
    h_NF = torch.nn.functional.silu(torch._grouped_mm(xs_ND, params.w_gate_EDF, offs=offs_E)) \
        * torch._grouped_mm(xs_ND, params.w_up_EDF, offs=offs_E)
    o_ND = torch._grouped_mm(h_NF, params.w_down_EFD, offs=offs_E)
    w_N = routing.weights_TK.reshape(-1)[sel_N].to(x_TD.dtype)
    y_TD = torch.zeros_like(x_TD).index_add_(0, tok_N, o_ND * w_N[:, None])
    if params.shared_w_gate_DF is not None:
        y_TD = y_TD + swiglu(x_TD, params.shared_w_gate_DF, params.shared_w_up_DF, params.shared_w_down_FD)
    return y_TD


def loop_layer(x_TD, params, cfg):
    routing = route(x_TD, params, cfg)
    return experts_forward(x_TD, routing, params, cfg)


def triton_layer(x_TD, params, cfg):
    from moescope.kernels.triton import experts_triton, route_triton

    return experts_triton(x_TD, route_triton(x_TD, params, cfg), params, cfg)


def work(x_TD, params, cfg):
    """(FLOPs, minimal bytes) of one layer call for this routing."""
    routing = route(x_TD, params, cfg)
    T, D = x_TD.shape
    E, _, F = params.w_gate_EDF.shape
    keep_TK = (routing.expert_ids_TK >= 0) & ~routing.dropped_TK
    n_kept = int(keep_TK.sum())
    active = int(((routing.tokens_per_expert_E - routing.dropped_per_expert_E) > 0).sum())
    elt = x_TD.element_size()
    flops = 2 * T * D * E + 6 * n_kept * D * F
    weight_bytes = active * 3 * D * F * elt + E * D * elt
    if params.shared_w_gate_DF is not None:
        FS = params.shared_w_gate_DF.shape[1]
        flops += 6 * T * D * FS
        weight_bytes += 3 * D * FS * elt
    return flops, weight_bytes + 2 * T * D * elt


def time_cuda(fn, repeats, warmup):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def bench_gpu(args) -> None:
    from moescope.kernels.triton import HAS_TRITON_GPU

    print(f"device: {torch.cuda.get_device_name()}  (roofline: H100 SXM {PEAK_BYTES_PER_S / 1e12:.2f} TB/s, "
          f"{PEAK_TFLOPS:.0f} bf16 TFLOP/s)")
    methods = {"torch_loop": loop_layer, "grouped_mm": grouped_mm_layer}
    if HAS_TRITON_GPU:
        methods = {"triton": triton_layer, **methods}
    else:
        print("Triton cannot target this GPU: timing the torch paths only")
    print(f"{'shape':8} {'T':>6} {'method':11} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>8} {'roofline':>8}  max|y-loop|")
    for shape in args.shapes:
        spec = SHAPES[shape]
        cfg, D, F = spec["cfg"], spec["D"], spec["F"]
        params = MoEParams.init(cfg, D, F, generator=torch.Generator(device="cuda").manual_seed(0),
                                dtype=torch.bfloat16, device="cuda")
        for T in args.tokens:
            x_TD = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
            flops, nbytes = work(x_TD, params, cfg)
            roof_s = max(flops / (PEAK_TFLOPS * 1e12), nbytes / PEAK_BYTES_PER_S)
            with torch.no_grad():
                y_ref = loop_layer(x_TD, params, cfg).float()
                for name, fn in methods.items():
                    try:
                        err = (fn(x_TD, params, cfg).float() - y_ref).abs().max().item()
                        s = time_cuda(lambda: fn(x_TD, params, cfg), args.repeats, args.warmup)
                    except (RuntimeError, NotImplementedError) as exc:  # e.g. _grouped_mm on this arch
                        print(f"{shape:8} {T:6d} {name:11} unavailable: {str(exc).splitlines()[0][:80]}")
                        continue
                    print(f"{shape:8} {T:6d} {name:11} {s * 1e3:9.3f} {flops / s / 1e12:8.1f} "
                          f"{nbytes / s / 1e9:8.0f} {roof_s / s:8.1%}  {err:.3g}")
            del x_TD
        del params
        torch.cuda.empty_cache()


def sanity_cpu() -> None:
    """Tiny fp32 check of the three paths on the Triton interpreter; no timing is reported."""
    cfg = MoEConfig.deepseek(num_experts=8, top_k=2, shared=1)
    params = MoEParams.init(cfg, 32, 32, generator=torch.Generator().manual_seed(0))
    x_TD = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y_loop = loop_layer(x_TD, params, cfg)
        results = {"triton (interpreter)": triton_layer(x_TD, params, cfg)}
        if hasattr(torch, "_grouped_mm"):
            try:
                results["grouped_mm"] = grouped_mm_layer(x_TD.bfloat16(), MoEParams(
                    **{k: (v.bfloat16() if v is not None and v.is_floating_point() and k != "router_bias_E" else v)
                       for k, v in vars(params).items()}), cfg).float()
            except (RuntimeError, NotImplementedError) as exc:
                print(f"  grouped_mm: unavailable on CPU ({str(exc).splitlines()[0][:80]})")
    ok = True
    for name, y in results.items():
        err = (y - y_loop).abs().max().item()
        tol = 1e-4 if "triton" in name else 0.1  # grouped_mm runs in bf16
        ok &= err <= tol
        print(f"  {name:22} max|y - torch_loop| = {err:.3g}  ({'ok' if err <= tol else 'MISMATCH'})")
    if not ok:
        raise SystemExit("sanity check failed: the paths disagree")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 1024, 16384], help="token counts T")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["mixtral", "fine"],
                        help="mixtral: E=8 top-2 F=14336; fine: E=128 top-8 F=768 + shared expert")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per point (median reported)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls first (compilation, autotune)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("No CUDA device: no GPU timings measured or reported. "
              "Running a tiny correctness sanity check on the Triton CPU interpreter instead.")
        sanity_cpu()
        return 0
    bench_gpu(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
