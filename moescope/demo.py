"""`moescope demo`: train the reference MoE on the bundled corpus with the probe attached.

Records every routing decision of training into the store, saves checkpoints (with
their model config, so `moescope replay` can rebuild them) as it goes, then registers
a held-out probe set of the corpus and replays it through every checkpoint, so drift
between checkpoints is measured on exactly the same tokens.
"""
from __future__ import annotations

import contextlib
import itertools
import time
from pathlib import Path

import torch

from moescope.collector.store import Store, check_run_id
from moescope.probe_sets import CORPUS_SEED as PROBE_SET_SEED  # held-out sequences, a seed disjoint from training
from moescope.token_texts import ByteTokenizer


def demo_model_config(backend: str = "torch"):
    from moescope.kernels import MoEConfig, ModelConfig

    return ModelConfig(vocab_size=256, hidden_size=96, num_layers=4, num_heads=4, ffn_size=192, max_seq_len=128,
                       moe=MoEConfig(num_experts=8, top_k=2, score="softmax", capacity_factor=1.25), backend=backend)


def run_demo(store: Store, *, steps: int = 60, run: str | None = None, seed: int = 0, checkpoints: int = 4,
             backend: str = "torch", batch_size: int = 16, seq_len: int = 128, progress: bool = True) -> str:
    from tqdm.auto import tqdm

    from moescope.corpus import batches, build_corpus
    from moescope.kernels import MoETransformer
    from moescope.probe import attach
    from moescope.probe.sinks import LocalSink

    run = check_run_id(run or time.strftime("demo-%Y%m%d-%H%M%S"))
    torch.manual_seed(seed)
    started = time.perf_counter()
    corpus = build_corpus(seq_len=seq_len, seed=seed)
    model = MoETransformer.from_config(demo_model_config(backend), seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    ckpt_dir = store.checkpoint_dir(run)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    save_at = sorted({max(1, round(steps * (i + 1) / checkpoints)) for i in range(max(checkpoints, 1))})
    stream = itertools.cycle(list(batches(corpus, batch_size=batch_size, generator=torch.Generator().manual_seed(seed))))
    saved: list[tuple[str, int, Path]] = [("step-0", 0, _save(model, ckpt_dir, 0))]
    store.add_checkpoint(run, "step-0", 0, str(saved[0][2]))
    tokens = 0
    model.train()
    # The sink writes with the store's own metadata DB, however it was given (--database-url included).
    with contextlib.closing(LocalSink(store.root, store.database_url)) as sink, \
            attach(model, sink=sink, run=run, checkpoint="step-0", step=0, tokenizer=ByteTokenizer()) as probe:
        bar = tqdm(range(1, steps + 1), desc=f"training {run}", unit="step", disable=not progress)
        for step in bar:
            input_ids, attention_mask, domains = next(stream)
            out = train_step(model, optimizer, probe, step, input_ids, attention_mask, domains)
            tokens += int(attention_mask.sum())
            bar.set_postfix(loss=f"{out.loss.item():.3f}")
            if step in save_at:
                name = f"step-{step}"
                saved.append((name, step, _save(model, ckpt_dir, step)))
                store.add_checkpoint(run, name, step, str(saved[-1][2]))
                probe.set_checkpoint(name, step=step)
        train_stats = probe.stats()
    replay_rows = replay_checkpoints(store, run, saved, seq_len=seq_len, progress=progress)
    elapsed = time.perf_counter() - started
    layers = len(store.layers(run))
    return (f"run {run}: {steps} steps, {tokens:,} tokens x {layers} MoE layers recorded, {len(saved)} checkpoints, "
            f"{replay_rows:,} replay tokens, probe failures {train_stats.get('failures', 0)}, {elapsed:.0f}s\n"
            f"store: {store.root}\n"
            f"look: moescope serve --store {store.root}")


def replay_checkpoints(store: Store, run: str, saved: list[tuple[str, int, Path]], *, seq_len: int = 128,
                       sequences_per_domain: int = 4, progress: bool = True) -> int:
    """Register the held-out corpus probe set and replay it through every checkpoint; returns tokens replayed.

    Each replay is recorded with phase 'eval', tagged with the probe set, so drift
    metrics compare checkpoints on exactly these tokens.
    """
    from tqdm.auto import tqdm

    from moescope.probe.replay import load_reference_checkpoint, replay
    from moescope.probe_sets import ProbeSet

    name = demo_probe_set_name(seq_len)
    store.register_probe_set(name, ProbeSet.from_corpus(seq_len=seq_len, sequences_per_domain=sequences_per_domain))
    tokens = 0
    for ckpt, step, path in tqdm(saved, desc="replaying probe set", unit="ckpt", disable=not progress):
        model, _ = load_reference_checkpoint(path)
        tokens += replay(model, store, name, run=run, checkpoint=ckpt, step=step, path=str(path), batch_size=64,
                         tokenizer=ByteTokenizer())["tokens"]
    return tokens


def demo_probe_set_name(seq_len: int = 128) -> str:
    """The demo's probe set: held-out sequences of the bundled corpus (registered once per store)."""
    return f"corpus-{seq_len}"


def train_step(model, optimizer, probe, step: int, input_ids, attention_mask, domains):
    """One recorded training step of the reference model (language-model loss, router bias update)."""
    probe.set_step(step)
    probe.set_domains(domains)
    out = model(input_ids, attention_mask=attention_mask, labels=input_ids)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.update_router_biases()
    return out


def _save(model, ckpt_dir: Path, step: int) -> Path:
    from moescope.probe.replay import save_reference_checkpoint

    return save_reference_checkpoint(model, ckpt_dir / f"step-{step}.pt", step)
