"""The README's Python examples for attaching the probe and querying the store, run as written.

Other sections' examples run in the tests of what they show (drift, incidents, alerts,
what-if); this file covers "Attach the probe to your own model".
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(heading: str) -> list[str]:
    section = README.read_text().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def loader(batch_size: int = 4, steps: int = 3):
    from moescope.corpus import batches, build_corpus

    corpus = build_corpus(seq_len=32, sequences_per_domain=4, seed=0)
    out = []
    for input_ids, mask, domains in batches(corpus, batch_size=batch_size, generator=torch.Generator().manual_seed(0)):
        out.append({"input_ids": input_ids, "attention_mask": mask, "domains": domains})
    return out[:steps]


def reference_model():
    from moescope.kernels import ModelConfig, MoEConfig, MoETransformer

    cfg = ModelConfig(vocab_size=256, hidden_size=32, num_layers=4, num_heads=2, ffn_size=64, max_seq_len=64,
                      moe=MoEConfig(num_experts=8, top_k=2, score="softmax"))
    return MoETransformer.from_config(cfg, seed=0)


class UserMoE(nn.Module):
    """A model of the user's own: each block's router is a plain Linear under `.moe.router`."""

    def __init__(self, layers: int = 2, hidden: int = 16, experts: int = 64):
        super().__init__()
        self.embed = nn.Embedding(256, hidden)
        self.blocks = nn.ModuleList(nn.Module() for _ in range(layers))
        for block in self.blocks:
            block.moe = nn.Module()
            block.moe.router = nn.Linear(hidden, experts, bias=False)

    def forward(self, input_ids):
        h_BSD = self.embed(input_ids)
        for block in self.blocks:
            h_BSD = h_BSD + 0.01 * block.moe.router(h_BSD)[..., : h_BSD.shape[-1]]
        return h_BSD


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write and read ./moescope-data
    monkeypatch.delenv("MOESCOPE_STORE", raising=False)
    monkeypatch.delenv("MOESCOPE_DATABASE_URL", raising=False)
    return tmp_path


def test_readme_attach_spec_and_query_examples_run_as_written(here):
    attach_block, spec_block, query_block = python_blocks("Attach the probe to your own model")
    model, batches = reference_model(), loader()
    exec(compile(attach_block, "README.md", "exec"), {"model": model, "loader": batches})

    user_model = UserMoE()
    scope = {"model": user_model, "input_ids": torch.randint(0, 256, (2, 8))}
    exec("from moescope.probe import attach\n" + spec_block, scope)

    scope = {}
    exec(compile(query_block, "README.md", "exec"), scope)
    import moescope

    store = moescope.open_store(here / "moescope-data", create=False)
    assert set(store.runs().run) == {"my-run", "custom-run"}
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    assert store.sql("SELECT count(*) AS n FROM routing WHERE layer = 3", run="my-run").n[0] == tokens * 2
    assert set(store.sql("SELECT DISTINCT domain FROM routing", run="my-run").domain) == {
        d for b in batches for d in b["domains"]}
    custom = store.sql("SELECT layer, count(*) AS n, max(slot) AS k, max(expert) AS e FROM routing GROUP BY layer",
                       run="custom-run")
    assert custom.n.tolist() == [16 * 6, 16 * 6] and custom.k.max() == 5 and custom.e.max() < 64
    maxvio = store.metric("maxvio", run="my-run", layers=[3], steps=(0, 5000))
    assert set(maxvio.layer) == {3} and (maxvio.maxvio >= 0).all()
