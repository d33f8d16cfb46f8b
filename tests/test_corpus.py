"""The bundled offline corpus: deterministic, four distinct domains, padded batches, no network."""
import socket

import pytest
import torch

from moescope.corpus import DOMAINS, PAD_ID, Sequence, batches, build_corpus


def test_corpus_is_deterministic_for_a_seed_and_differs_across_seeds():
    a = build_corpus(seq_len=64, sequences_per_domain=8, seed=3)
    b = build_corpus(seq_len=64, sequences_per_domain=8, seed=3)
    c = build_corpus(seq_len=64, sequences_per_domain=8, seed=4)
    assert a == b
    assert [s.token_ids for s in a] != [s.token_ids for s in c]


def test_corpus_has_every_domain_with_bytes_within_length():
    corpus = build_corpus(seq_len=64, sequences_per_domain=10, seed=0)
    assert len(DOMAINS) == 4 and {"code", "prose", "arithmetic"} <= set(DOMAINS)
    assert [s.domain for s in corpus] == [d for d in DOMAINS for _ in range(10)]
    for s in corpus:
        assert isinstance(s, Sequence) and 16 <= len(s.token_ids) <= 64
        assert all(0 <= t <= 255 for t in s.token_ids)
    assert any(len(s.token_ids) < 64 for s in corpus)  # some padding will occur


def test_domains_are_recognisably_different():
    corpus = build_corpus(seq_len=128, sequences_per_domain=16, seed=0)
    text = {d: b"".join(bytes(s.token_ids) for s in corpus if s.domain == d) for d in DOMAINS}
    assert b" = " in text["arithmetic"] and set(text["arithmetic"]) <= set(b"0123456789+-*= \n")
    assert b"def " in text["code"] or b"import " in text["code"] or b"self" in text["code"]
    letters = sum(chr(c).isalpha() for c in text["prose"]) / len(text["prose"])
    assert letters > 0.7
    assert text["records"].count(b'{"id": ') >= 16


def test_building_the_corpus_needs_no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the corpus tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert len(build_corpus(seq_len=32, sequences_per_domain=2, seed=1)) == 2 * len(DOMAINS)


def test_batches_pad_short_sequences_and_cover_the_corpus_once():
    corpus = build_corpus(seq_len=64, sequences_per_domain=10, seed=0)
    out = list(batches(corpus, batch_size=16, generator=torch.Generator().manual_seed(0)))
    assert [len(d) for _, _, d in out] == [16, 16, 8]
    seen = []
    for input_ids_BS, mask_BS, domains in out:
        assert input_ids_BS.dtype == torch.int64 and input_ids_BS.shape == mask_BS.shape
        assert (input_ids_BS[mask_BS == 0] == PAD_ID).all()
        for row, m in zip(input_ids_BS, mask_BS):
            assert m.tolist() == sorted(m.tolist(), reverse=True)  # right padding
            seen.append(row[m.bool()].tolist())
    assert any((m == 0).any() for _, m, _ in out)
    assert sorted(seen) == sorted(s.token_ids for s in corpus)


def test_batches_order_follows_the_generator():
    corpus = build_corpus(seq_len=32, sequences_per_domain=4, seed=0)
    first = [d for _, _, d in batches(corpus, batch_size=4, generator=torch.Generator().manual_seed(5))]
    again = [d for _, _, d in batches(corpus, batch_size=4, generator=torch.Generator().manual_seed(5))]
    other = [d for _, _, d in batches(corpus, batch_size=4, generator=torch.Generator().manual_seed(6))]
    assert first == again and first != other


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(seq_len=4), ValueError, "seq_len"),
    (dict(sequences_per_domain=0), ValueError, "sequences_per_domain"),
    (dict(seed="x"), TypeError, "seed"),
])
def test_build_corpus_rejects_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        build_corpus(**kwargs)


def test_batches_rejects_bad_arguments():
    corpus = build_corpus(seq_len=32, sequences_per_domain=1)
    with pytest.raises(ValueError, match="batch_size"):
        next(batches(corpus, batch_size=0, generator=torch.Generator()))
    with pytest.raises(TypeError, match="generator"):
        next(batches(corpus, batch_size=2, generator=0))
    with pytest.raises(ValueError, match="corpus"):
        next(batches([], batch_size=2, generator=torch.Generator()))
