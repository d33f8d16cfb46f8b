"""Probe sets: named token sequences, with domain labels, replayed through checkpoints.

Legend: N sequences, S positions (the longest sequence), B sequences of one batch.

A probe set is registered once per store (`Store.register_probe_set`) and identified by
a hash of its content. A replay (`moescope.probe.replay`) records each sequence with
`seq` = its index in the set and `probe_set` = the set's name, so every drift metric
joins checkpoints (or model versions) on (probe_set, seq, pos) with equal token ids:
the same tokens, never coincidental matches of training batches.

    from moescope.probe_sets import ProbeSet
    store.register_probe_set("held-out", ProbeSet.from_corpus())
    store.register_probe_set("chat", ProbeSet.from_texts(texts, tokenizer, domains=labels))
    store.register_probe_set("eval", ProbeSet.from_tensors(input_ids_NS, attention_mask_NS, domains))
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from moescope.schema import RUN_ID

# Held-out sequences of the bundled corpus: a seed disjoint from the demo's training seeds.
CORPUS_SEED = 10_000

TABLE_SCHEMA = pa.schema([
    pa.field("sequence", pa.int32(), nullable=False),
    pa.field("domain", pa.string(), nullable=True),
    pa.field("token_ids", pa.list_(pa.int32()), nullable=False),
])


class ProbeSetError(ValueError):
    """A probe set that cannot be built or used as asked; the message says why."""


def check_probe_set_name(name) -> str:
    """Probe-set names name files under the store root, so they use the run-id alphabet."""
    if not isinstance(name, str) or not RUN_ID.fullmatch(name):
        raise ProbeSetError(f"invalid probe set name {name!r}: use letters, digits and . _ : + - "
                            "(at most 200, not starting with a symbol)")
    return name


@dataclass(frozen=True, eq=False)
class ProbeSet:
    """N token sequences (int32 ids, at least one token each) and a domain label (or None) per sequence."""

    sequences: tuple[np.ndarray, ...]
    domains: tuple[str | None, ...]
    source: str
    name: str | None = None

    def __post_init__(self):
        seqs = tuple(self.sequences)
        if not seqs:
            raise ProbeSetError("a probe set needs at least one sequence")
        arrays = []
        for i, s in enumerate(seqs):
            a = np.asarray(s)
            if a.ndim != 1 or a.size == 0 or not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
                raise ProbeSetError(f"probe set sequence {i} must be a non-empty 1-D list of int token ids")
            if a.min() < 0 or a.max() > np.iinfo(np.int32).max:
                raise ProbeSetError(f"probe set sequence {i} has token ids outside 0..2**31-1")
            arrays.append(np.ascontiguousarray(a, dtype=np.int32))
        domains = tuple(self.domains)
        if len(domains) != len(arrays):
            raise ProbeSetError(f"a probe set needs one domain label per sequence: {len(domains)} labels for "
                                f"{len(arrays)} sequences")
        if not all(d is None or isinstance(d, str) for d in domains):
            raise ProbeSetError("probe set domain labels must be strings or None")
        object.__setattr__(self, "sequences", tuple(arrays))
        object.__setattr__(self, "domains", domains)

    # ------------------------------------------------------------ builders
    @classmethod
    def from_sequences(cls, sequences: Sequence[Sequence[int]], domains: Sequence[str | None] | None = None, *,
                       source: str = "sequences") -> "ProbeSet":
        seqs = list(sequences)
        return cls(tuple(np.asarray(s) for s in seqs), tuple(domains) if domains is not None else (None,) * len(seqs),
                   source)

    @classmethod
    def from_corpus(cls, *, seq_len: int = 128, sequences_per_domain: int = 4, seed: int = CORPUS_SEED) -> "ProbeSet":
        """Held-out sequences of the bundled corpus (moescope.corpus), domain-major order."""
        from moescope.corpus import build_corpus

        corpus = build_corpus(seq_len=seq_len, sequences_per_domain=sequences_per_domain, seed=seed)
        return cls.from_sequences([s.token_ids for s in corpus], [s.domain for s in corpus],
                                  source=f"corpus(seq_len={seq_len}, sequences_per_domain={sequences_per_domain}, seed={seed})")

    @classmethod
    def from_texts(cls, texts: Sequence[str], tokenizer: Callable, domains: Sequence[str | None] | None = None, *,
                   max_length: int | None = None) -> "ProbeSet":
        """Texts through `tokenizer`: any callable text -> list of ids, or a Hugging Face tokenizer."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ProbeSetError("from_texts() takes a list of strings")
        if not callable(tokenizer):
            raise ProbeSetError(f"tokenizer must be callable (text -> token ids), got {type(tokenizer).__name__}")
        seqs = []
        for i, text in enumerate(texts):
            out = tokenizer(text)
            ids = out["input_ids"] if isinstance(out, Mapping) else out  # a Hugging Face BatchEncoding is a Mapping
            ids = list(ids.tolist() if hasattr(ids, "tolist") else ids)
            if ids and isinstance(ids[0], list):  # a batch of one
                ids = ids[0]
            if max_length is not None:
                ids = ids[:max_length]
            if not ids:
                raise ProbeSetError(f"text {i} tokenizes to no tokens")
            seqs.append(ids)
        name = getattr(tokenizer, "name_or_path", None) or getattr(tokenizer, "__name__", type(tokenizer).__name__)
        return cls.from_sequences(seqs, domains, source=f"texts(tokenizer={name}, max_length={max_length})")

    @classmethod
    def from_tensors(cls, input_ids_NS, attention_mask_NS=None, domains: Sequence[str | None] | None = None) -> "ProbeSet":
        """Rows of a (N, S) id tensor or array; the attention mask (if given) marks the real tokens of each row."""
        ids = np.asarray(input_ids_NS.cpu() if hasattr(input_ids_NS, "cpu") else input_ids_NS)
        if ids.ndim != 2:
            raise ProbeSetError(f"input_ids must have shape (sequences, positions), got {ids.shape}")
        if attention_mask_NS is None:
            mask = np.ones(ids.shape, bool)
        else:
            mask = np.asarray(attention_mask_NS.cpu() if hasattr(attention_mask_NS, "cpu") else attention_mask_NS) != 0
            if mask.shape != ids.shape:
                raise ProbeSetError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
        return cls.from_sequences([row[m] for row, m in zip(ids, mask)], domains, source="tensors")

    # ------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def tokens(self) -> int:
        return int(sum(s.size for s in self.sequences))

    def content_hash(self) -> str:
        """sha256 of the sequences and their domains (names and sources do not count)."""
        h = hashlib.sha256()
        for seq, domain in zip(self.sequences, self.domains):
            label = b"\x00" if domain is None else b"\x01" + domain.encode()
            h.update(len(seq).to_bytes(8, "little") + seq.astype("<i4").tobytes())
            h.update(len(label).to_bytes(8, "little") + label)
        return h.hexdigest()

    def to_table(self) -> pa.Table:
        return pa.table({"sequence": pa.array(np.arange(len(self), dtype=np.int32)),
                         "domain": pa.array(list(self.domains), pa.string()),
                         "token_ids": pa.array([s.tolist() for s in self.sequences], pa.list_(pa.int32()))},
                        schema=TABLE_SCHEMA)

    @classmethod
    def from_table(cls, table: pa.Table, *, source: str, name: str | None = None) -> "ProbeSet":
        table = table.sort_by("sequence")
        seqs = tuple(np.asarray(s, dtype=np.int32) for s in table.column("token_ids").to_pylist())
        return cls(seqs, tuple(table.column("domain").to_pylist()), source, name)

    def to_tensors(self):
        """(input_ids_NS int64, attention_mask_NS int64, domains), right-padded with id 0."""
        (_, ids, mask, domains), = self.batches(len(self))
        return ids, mask, domains

    def batches(self, batch_size: int) -> Iterator[tuple[int, "object", "object", list]]:
        """(first sequence index, input_ids_BS, attention_mask_BS, domains) in index order, right-padded."""
        import torch

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ProbeSetError(f"batch_size must be a positive int, got {batch_size!r}")
        for first in range(0, len(self), batch_size):
            chosen = self.sequences[first:first + batch_size]
            s = max(a.size for a in chosen)
            ids_BS = torch.zeros((len(chosen), s), dtype=torch.int64)
            mask_BS = torch.zeros((len(chosen), s), dtype=torch.int64)
            for b, a in enumerate(chosen):
                ids_BS[b, :a.size] = torch.from_numpy(a.astype(np.int64))
                mask_BS[b, :a.size] = 1
            yield first, ids_BS, mask_BS, list(self.domains[first:first + batch_size])
