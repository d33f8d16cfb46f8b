"""The bundled offline corpus: four byte-level domains built from what every Python install has.

Legend: B batch, S sequence length.

Domains, each a clearly different byte distribution, so expert specialisation has something
to find: "code" (the standard library's own .py files), "prose" (the English documentation
text shipped in pydoc_data.topics), "arithmetic" (generated "123 + 456 = 579" lines) and
"records" (generated JSON-lines records). Nothing is downloaded; a seed fixes everything.
"""
from __future__ import annotations

import json
import random
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

DOMAINS = ("code", "prose", "arithmetic", "records")
PAD_ID = 0
SHORT_FRACTION = 0.25  # share of sequences cut short so batches carry padding


@dataclass
class Sequence:
    token_ids: list[int]  # bytes 0..255
    domain: str


def build_corpus(*, seq_len: int = 128, sequences_per_domain: int = 64, seed: int = 0) -> list[Sequence]:
    """sequences_per_domain sequences of each domain (domain-major order), at most seq_len bytes each."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 8:
        raise ValueError(f"seq_len must be an int >= 8, got {seq_len!r}")
    if isinstance(sequences_per_domain, bool) or not isinstance(sequences_per_domain, int) or sequences_per_domain < 1:
        raise ValueError(f"sequences_per_domain must be a positive int, got {sequences_per_domain!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    makers = {"code": _code, "prose": _prose, "arithmetic": _arithmetic, "records": _records}
    corpus = []
    for index, domain in enumerate(DOMAINS):
        rng = random.Random(seed * len(DOMAINS) + index)  # independent stream per domain
        for text in makers[domain](rng, seq_len, sequences_per_domain):
            data = text[:seq_len]
            if rng.random() < SHORT_FRACTION:
                data = data[:rng.randint(seq_len // 4, seq_len - 1)]
            corpus.append(Sequence(token_ids=list(data), domain=domain))
    return corpus


def batches(corpus: list[Sequence], *, batch_size: int,
            generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor, list[str]]]:
    """Shuffled batches (input_ids_BS, attention_mask_BS, domains); right-padded with id 0, mask 0,
    to the longest sequence of the batch. The last batch may be smaller."""
    if not corpus or not all(isinstance(s, Sequence) for s in corpus):
        raise ValueError("corpus must be a non-empty list of Sequence")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    order = torch.randperm(len(corpus), generator=generator).tolist()
    for start in range(0, len(order), batch_size):
        chosen = [corpus[i] for i in order[start:start + batch_size]]
        S = max(len(s.token_ids) for s in chosen)
        input_ids_BS = torch.full((len(chosen), S), PAD_ID, dtype=torch.int64)
        attention_mask_BS = torch.zeros((len(chosen), S), dtype=torch.int64)
        for b, seq in enumerate(chosen):
            input_ids_BS[b, :len(seq.token_ids)] = torch.tensor(seq.token_ids, dtype=torch.int64)
            attention_mask_BS[b, :len(seq.token_ids)] = 1
        yield input_ids_BS, attention_mask_BS, [s.domain for s in chosen]


def _code(rng: random.Random, seq_len: int, count: int) -> list[bytes]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.stat().st_size > 4 * seq_len)
    if not files:
        raise RuntimeError(f"no standard-library sources found under {stdlib}")
    out, cache = [], {}
    for _ in range(count):
        path = rng.choice(files)
        data = cache.setdefault(path, path.read_bytes())
        start = rng.randrange(0, len(data) - seq_len)
        start = min(data.find(b"\n", start) + 1, len(data) - seq_len)  # begin on a line, as code is read
        out.append(data[start:start + seq_len])
    return out


def _prose(rng: random.Random, seq_len: int, count: int) -> list[bytes]:
    from pydoc_data.topics import topics

    # Keep the running English text; indented blocks are grammar rules and code examples.
    paragraphs = [p.replace("\n", " ") for key in sorted(topics) for p in topics[key].split("\n\n")
                  if p and not p.startswith((" ", "*", "=")) and sum(c.isalpha() or c == " " for c in p) > 0.9 * len(p)]
    data = "\n\n".join(paragraphs).encode("utf-8")
    out = []
    for _ in range(count):
        start = rng.randrange(0, len(data) - 2 * seq_len)
        start = min(data.find(b" ", start) + 1, len(data) - seq_len)  # begin on a word
        out.append(data[start:start + seq_len])
    return out


def _arithmetic(rng: random.Random, seq_len: int, count: int) -> list[bytes]:
    out = []
    for _ in range(count):
        lines = []
        while sum(map(len, lines)) < seq_len:
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            op = rng.choice("+-*")
            result = a + b if op == "+" else a - b if op == "-" else a * b
            lines.append(f"{a} {op} {b} = {result}\n")
        out.append("".join(lines).encode("ascii"))
    return out


_NAMES = ("ada", "grace", "alan", "edsger", "barbara", "donald", "ken", "dennis", "margaret", "john")
_CITIES = ("Lisbon", "Osaka", "Lagos", "Quito", "Oslo", "Perth", "Austin", "Delhi")


def _records(rng: random.Random, seq_len: int, count: int) -> list[bytes]:
    out = []
    for _ in range(count):
        lines = []
        while sum(map(len, lines)) < seq_len:
            record = {"id": rng.randint(1000, 99999), "user": rng.choice(_NAMES), "city": rng.choice(_CITIES),
                      "active": rng.random() < 0.5, "score": round(rng.uniform(0, 100), 2)}
            lines.append(json.dumps(record) + "\n")
        out.append("".join(lines).encode("ascii"))
    return out
