"""attach(..., tokenizer=...): the text of every token id the run's rows carry is recorded with the run, once.

The tokenizer is a byte-level BPE trained here on the bundled corpus's prose (nothing downloaded),
wrapped as a transformers fast tokenizer, the way users hand theirs to attach().
"""
from __future__ import annotations

import pytest
import torch

from moescope.corpus import build_corpus
from moescope.kernels import MoEConfig, ModelConfig, MoETransformer
from moescope.probe import attach
from moescope.token_texts import texts_for

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")


def prose_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [bytes(s.token_ids).decode("utf-8", errors="ignore")
             for s in build_corpus(seq_len=128, sequences_per_domain=24) if s.domain == "prose"]
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["[PAD]", "[UNK]"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]"), texts


def test_the_text_of_each_token_id_seen_is_recorded_with_the_run(store):
    tok, texts = prose_tokenizer()
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=2, ffn_size=64, max_seq_len=64,
                      moe=MoEConfig(num_experts=4, top_k=2, score="softmax"))
    model = MoETransformer.from_config(cfg, seed=0).eval()
    batch = tok(texts[:6], max_length=48, truncation=True, padding=True, return_tensors="pt")
    with attach(model, sink=f"local:{store.root}", run="bpe", tokenizer=tok, frame_interval_s=0.05) as probe:
        with torch.no_grad():
            for start in (0, 3):  # two forwards, a frame each
                model(batch["input_ids"][start:start + 3], attention_mask=batch["attention_mask"][start:start + 3])
                probe.flush()
    seen = set(store.sql("SELECT DISTINCT token_id FROM routing", run="bpe").token_id)
    recorded = store.token_texts("bpe")
    assert set(recorded) == seen and len(seen) > 50
    assert recorded == texts_for(tok, sorted(seen))
    words = {i: t for i, t in recorded.items() if t == tok.decode([i]) and t.strip().isalpha() and len(t.strip()) > 2}
    assert words  # whole words read as themselves (" the", "tion"), not as "Ġthe"


def test_a_wrong_tokenizer_is_a_one_line_type_error(store):
    model = MoETransformer.from_config(ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, ffn_size=64,
                                                   max_seq_len=16, moe=MoEConfig(num_experts=4, top_k=2)), seed=0)
    with pytest.raises(TypeError, match="tokenizer must have one of decode"):
        attach(model, sink="memory", run="r", tokenizer="gpt2")
