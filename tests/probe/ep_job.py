"""A torchrun job for tests/probe/test_placement_ep.py: real expert-parallel MoE layers (gloo, CPU, 2 ranks).

Usage: ep_job.py megatron|deepspeed OUT. Each rank attaches a probe with no map, runs a few
steps through the framework's own MoE layer, and writes its encoded frames to OUT/rank<r>-<seq>.frame.

Megatron-Core 0.16.1 on a CPU-only torch: its gating asks torch.cuda.current_device() and
reads te_general_gemm, which exists only with Transformer Engine; both are replaced (current
device -> "cpu", te_general_gemm -> None, Megatron's own torch.mm fallback), as in
tests/probe/test_adapters_megatron.py. The allgather dispatcher is used: the alltoall one
creates a CUDA stream at construction.
"""
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from moescope.frame import encode
from moescope.probe import attach
from moescope.probe.sinks import MemorySink

framework, out = sys.argv[1], Path(sys.argv[2])
E, D, LAYERS, STEPS = 8, 16, 2, 3


class Stack(nn.Module):
    def __init__(self, layers, call):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.call = call

    def forward(self, x):
        for layer in self.layers:
            x = x + self.call(layer, x)
        return x


def megatron_model():
    dist.init_process_group("gloo")
    from megatron.core import parallel_state
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    torch.cuda.current_device = lambda: "cpu"
    moe_utils.te_general_gemm = None
    parallel_state.initialize_model_parallel(expert_model_parallel_size=dist.get_world_size())
    config = TransformerConfig(num_layers=LAYERS, hidden_size=D, num_attention_heads=2, num_moe_experts=E,
                               moe_router_topk=2, use_cpu_initialization=True, moe_router_load_balancing_type="none",
                               moe_aux_loss_coeff=0.0, expert_model_parallel_size=dist.get_world_size(),
                               moe_token_dispatcher_type="allgather")
    spec = get_moe_module_spec(use_te=False, num_experts=E, moe_grouped_gemm=False)
    torch.manual_seed(0)
    layers = [build_module(spec, config=config) for _ in range(LAYERS)]
    return Stack(layers, lambda layer, x: layer(x)[0]), (12, 2, D)


def deepspeed_model():
    import deepspeed
    from deepspeed.moe.layer import MoE

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    layers = [MoE(hidden_size=D, expert=nn.Linear(D, D), num_experts=E, ep_size=dist.get_world_size(), k=2)
              for _ in range(LAYERS)]
    for layer in layers:
        layer.set_deepspeed_parallelism()
    return Stack(layers, lambda layer, x: layer(x)[0]), (2, 12, D)


model, shape = megatron_model() if framework == "megatron" else deepspeed_model()
rank = dist.get_rank()
sink = MemorySink()
with attach(model, sink=sink, run=f"ep-{framework}", rank=rank) as probe:
    for step in range(STEPS):
        probe.set_step(step)
        with torch.no_grad():
            model(torch.randn(*shape, generator=torch.Generator().manual_seed(100 * rank + step)))
for frame in sink.frames:
    (out / f"rank{rank}-{frame.seq}.frame").write_bytes(encode(frame))
dist.barrier()
dist.destroy_process_group()
os._exit(0)  # DeepSpeed's and Megatron's process groups hold threads that can delay a clean exit
