"""What every scenario shares: train the reference MoE on the bundled corpus with the probe attached.

Legend: B batch, S sequence, V vocab.

Runs are recorded through the real pipeline: the probe's local sink straight into the
store, or a Redis stream that `moescope worker`s ingest into the same store when a
broker URL is given. Held-out batches use the demo's probe-set seed, disjoint from training.
"""
from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from moescope.collector.store import Store, StoreError
from moescope.demo import PROBE_SET_SEED, train_step
from moescope.kernels import MoEConfig, ModelConfig, MoETransformer
from moescope.scenarios.report import ScenarioError
from moescope.token_texts import ByteTokenizer

Batch = tuple[Tensor, Tensor, list[str]]  # input_ids_BS, attention_mask_BS, domains


@dataclass(frozen=True)
class Setup:
    """Model size and optimiser of one training run; small enough for a busy CPU in minutes per 100 steps."""

    moe: MoEConfig
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    ffn_size: int = 128
    seq_len: int = 32
    batch_size: int = 8
    lr: float = 3e-3
    backend: str = "torch"

    def model_config(self) -> ModelConfig:
        return ModelConfig(vocab_size=256, hidden_size=self.hidden_size, num_layers=self.num_layers,
                           num_heads=self.num_heads, ffn_size=self.ffn_size, max_seq_len=self.seq_len, moe=self.moe,
                           backend=self.backend)

    def with_moe(self, **changes) -> "Setup":
        return replace(self, moe=replace(self.moe, **changes))


@dataclass
class Recorder:
    """Where scenario runs are recorded: the store's local sink, or a Redis broker feeding workers."""

    store: Store
    broker: str | None = None
    producers: list[str] = field(default_factory=list)

    @property
    def sink(self) -> str:
        return self.broker or f"local:{self.store.root}"

    @contextlib.contextmanager
    def attach(self, model, run: str, checkpoint: str, step: int = 0):
        from moescope.probe import attach

        # One producer per attachment: frame sequence numbers restart with each probe.
        producer = f"scenario-{run}-{checkpoint}-{len(self.producers)}"
        self.producers.append(producer)
        with attach(model, sink=self.sink, run=run, checkpoint=checkpoint, step=step, producer=producer,
                    tokenizer=ByteTokenizer()) as probe:  # the reference model reads bytes
            yield probe
        self.confirm(run)

    def confirm(self, run: str) -> None:
        """Through a broker, records reach the store only via a worker: fail clearly if they did not."""
        if self.broker is None:
            return
        try:
            ledger = self.store.ledger(run)
        except StoreError:
            ledger = None
        if ledger is None or ledger.empty or int(ledger.missing.sum()) or not int(ledger.stored.sum()):
            raise ScenarioError(f"records of run {run!r} did not reach store {str(self.store.root)!r} through "
                                f"{self.broker}; is `moescope worker --store {self.store.root}` running?")


@dataclass
class Trained:
    run: str
    model: MoETransformer
    steps: int
    train_loss: float                 # mean LM loss (aux excluded) over the last quarter of the steps
    checkpoints: list[tuple[str, int, Path]]


def training_batches(setup: Setup, seed: int) -> list[Batch]:
    from moescope.corpus import batches, build_corpus

    corpus = build_corpus(seq_len=setup.seq_len, seed=seed)
    return list(batches(corpus, batch_size=setup.batch_size, generator=torch.Generator().manual_seed(seed)))


def held_out_batches(setup: Setup, sequences_per_domain: int = 8, batch_size: int = 32) -> list[Batch]:
    """The held-out probe set: the same tokens for every run and checkpoint of a scenario."""
    from moescope.corpus import batches, build_corpus

    corpus = build_corpus(seq_len=setup.seq_len, sequences_per_domain=sequences_per_domain, seed=PROBE_SET_SEED)
    return list(batches(corpus, batch_size=batch_size, generator=torch.Generator().manual_seed(PROBE_SET_SEED)))


def lm_loss(out) -> Tensor:
    """The language-model part of the loss (the model adds the aux and z losses)."""
    return out.loss - out.aux_loss - out.z_loss


def train(recorder: Recorder, run: str, setup: Setup, *, steps: int, seed: int, progress: bool = False,
          before_step: Callable[[int, MoETransformer], None] | None = None, checkpoints: int = 0) -> Trained:
    """Train `steps` AdamW steps with the probe attached (phase "train"); optionally save checkpoints.

    before_step(step, model) runs before each step's forward (used to inject faults).
    """
    from tqdm.auto import tqdm

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ScenarioError(f"steps must be a positive int, got {steps!r}")
    model = MoETransformer.from_config(setup.model_config(), seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=setup.lr, weight_decay=0.0)
    stream = itertools.cycle(training_batches(setup, seed))
    save_at = {max(1, round(steps * (i + 1) / checkpoints)) for i in range(checkpoints)}
    ckpt_dir = recorder.store.checkpoint_dir(run)
    saved: list[tuple[str, int, Path]] = []
    if checkpoints:
        saved.append(_save(recorder.store, run, model, ckpt_dir, 0))
    losses = []
    model.train()
    with recorder.attach(model, run, "step-0") as probe:
        for step in tqdm(range(1, steps + 1), desc=run, unit="step", disable=not progress):
            input_ids, attention_mask, domains = next(stream)
            if before_step is not None:
                before_step(step, model)
            out = train_step(model, optimizer, probe, step, input_ids, attention_mask, domains)
            losses.append(float(lm_loss(out).detach()))
            if step in save_at:
                saved.append(_save(recorder.store, run, model, ckpt_dir, step))
                probe.set_checkpoint(saved[-1][0], step=step)
    tail = losses[-max(1, steps // 4):]
    return Trained(run=run, model=model, steps=steps, train_loss=sum(tail) / len(tail), checkpoints=saved)


@torch.no_grad()
def evaluate(recorder: Recorder | None, model: MoETransformer, batches: list[Batch], *, run: str | None = None,
             checkpoint: str = "final", step: int = 0) -> float:
    """Mean LM loss over `batches` in eval mode; recorded (phase "eval") under `checkpoint` when a recorder is given."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    with (recorder.attach(model, run, checkpoint, step) if recorder is not None else contextlib.nullcontext()) as probe:
        for input_ids, attention_mask, domains in batches:
            if probe is not None:
                probe.set_domains(domains)
            out = model(input_ids, attention_mask=attention_mask, labels=input_ids)
            n = int(attention_mask[:, 1:].sum())  # predicted positions on real tokens
            total += float(lm_loss(out)) * n
            tokens += n
    model.train(was_training)
    return total / max(tokens, 1)


def _save(store: Store, run: str, model, ckpt_dir: Path, step: int) -> tuple[str, int, Path]:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"step-{step}.pt"
    torch.save(model.state_dict(), path)
    store.add_checkpoint(run, f"step-{step}", step, str(path))
    return f"step-{step}", step, path
