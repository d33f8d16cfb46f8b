"""A torchrun job for tests/collector/test_multirank.py: the reference MoE trained with DDP (gloo, CPU),
a probe on every rank streaming to Redis. Each rank writes how many tokens it routed to OUT/rank<r>.json."""
import json
import os
import sys

import torch
import torch.distributed as dist

from moescope.corpus import batches, build_corpus
from moescope.kernels import ModelConfig, MoEConfig, MoETransformer
from moescope.probe import attach
from moescope.probe.redis_sink import RedisSink

url, run, out = sys.argv[1], sys.argv[2], sys.argv[3]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
cfg = ModelConfig(vocab_size=256, hidden_size=32, num_layers=2, num_heads=2, ffn_size=64, max_seq_len=64,
                  moe=MoEConfig(num_experts=8, top_k=2, score="softmax"))
model = torch.nn.parallel.DistributedDataParallel(MoETransformer.from_config(cfg, seed=0))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
corpus = build_corpus(seq_len=32, sequences_per_domain=8, seed=rank)  # each rank its own shard
data = list(batches(corpus, batch_size=4, generator=torch.Generator().manual_seed(rank)))[:3]
tokens = 0
sink = RedisSink(url, spool_dir=os.path.join(out, f"spool{rank}"), close_timeout_s=120, ack_poll_s=0.1)
with attach(model.module, sink=sink, run=run, checkpoint="c0") as probe:
    for step, (input_ids, mask, domains) in enumerate(data):
        probe.set_step(step)
        probe.set_domains(domains)
        loss = model(input_ids, attention_mask=mask, labels=input_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(mask.sum())
    stats = probe.stats()
sink.close()
with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
    json.dump({"rank": rank, "tokens": tokens, "producer": stats["producer"], "unacked": len(sink.unacked)}, fh)
dist.destroy_process_group()
