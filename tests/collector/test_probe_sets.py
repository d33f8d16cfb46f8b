"""Probe sets in the store: registered once, read back exactly, conflicts and bad names refused."""
import uuid

import numpy as np
import pyarrow as pa
import pytest
import torch

from moescope.collector.store import ProbeSetConflict, UnknownProbeSet
from moescope.analysis.store import AnalysisStore as Store
from moescope.corpus import build_corpus
from moescope.frame import Frame
from moescope.probe_sets import CORPUS_SEED, ProbeSet, ProbeSetError
from moescope.schema import TOKEN_STATS, conform


def _same(a: ProbeSet, b: ProbeSet) -> bool:
    return (len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a.sequences, b.sequences))
            and a.domains == b.domains)


def test_corpus_probe_set_round_trips_through_the_store(store):
    ps = ProbeSet.from_corpus(seq_len=32, sequences_per_domain=2)
    corpus = build_corpus(seq_len=32, sequences_per_domain=2, seed=CORPUS_SEED)
    assert [s.tolist() for s in ps.sequences] == [c.token_ids for c in corpus]
    row = store.register_probe_set("held-out", ps)
    assert row["sequences"] == 8 and row["tokens"] == sum(len(c.token_ids) for c in corpus)
    assert row["content_hash"] == ps.content_hash() and "seed=10000" in row["source"]
    back = store.probe_set("held-out")
    assert _same(back, ps) and back.name == "held-out"
    listing = store.probe_sets()
    assert listing.name.tolist() == ["held-out"] and listing.tokens.tolist() == [ps.tokens]
    path = store.root / row["path"]
    assert path.is_file() and path.parent == store.root / "probe_sets"


def test_texts_through_a_callable_or_a_hugging_face_style_tokenizer():
    from transformers import BatchEncoding

    texts = ["abc", "hello world"]
    plain = ProbeSet.from_texts(texts, lambda t: list(t.encode()), domains=["x", "y"])
    hf = ProbeSet.from_texts(texts, lambda t: BatchEncoding({"input_ids": list(t.encode())}), domains=["x", "y"])
    assert [s.tolist() for s in plain.sequences] == [list(b"abc"), list(b"hello world")]
    assert _same(plain, hf) and plain.content_hash() == hf.content_hash()
    assert ProbeSet.from_texts(texts, lambda t: list(t.encode()), max_length=2).tokens == 4
    with pytest.raises(ProbeSetError, match="text 0 tokenizes to no tokens"):
        ProbeSet.from_texts([""], lambda t: list(t.encode()))


def test_tensors_keep_only_the_masked_in_tokens_of_each_row():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    ps = ProbeSet.from_tensors(ids, mask, ["a", None])
    assert [s.tolist() for s in ps.sequences] == [[5, 6, 7], [8, 9]] and ps.domains == ("a", None)
    ids_NS, mask_NS, domains = ps.to_tensors()
    assert torch.equal(ids_NS, ids[:, :3]) and torch.equal(mask_NS, mask[:, :3]) and domains == ["a", None]
    first = [b[0] for b in ps.batches(1)]
    assert first == [0, 1]
    with pytest.raises(ProbeSetError, match="one domain label per sequence: 1 labels for 2 sequences"):
        ProbeSet.from_tensors(ids, mask, ["a"])


def test_registering_is_idempotent_and_other_content_under_a_name_is_refused(store):
    ps = ProbeSet.from_sequences([[1, 2, 3], [4]], ["a", "b"])
    first = store.register_probe_set("p", ps)
    again = store.register_probe_set("p", ProbeSet.from_sequences([[1, 2, 3], [4]], ["a", "b"], source="elsewhere"))
    assert again == first and len(store.probe_sets()) == 1
    for other in (ProbeSet.from_sequences([[1, 2, 3], [5]], ["a", "b"]), ProbeSet.from_sequences([[1, 2, 3], [4]], ["a", "c"])):
        with pytest.raises(ProbeSetConflict, match="probe set 'p' is already registered with other content"):
            store.register_probe_set("p", other)
    assert _same(store.probe_set("p"), ps)
    assert sorted(p.name for p in (store.root / "probe_sets").iterdir()) == [first["path"].split("/")[-1]]


def test_a_second_store_handle_sees_the_registration(store):
    store.register_probe_set("p", ProbeSet.from_sequences([[1, 2]]))
    other = Store(store.root)
    try:
        assert _same(other.probe_set("p"), ProbeSet.from_sequences([[1, 2]]))
    finally:
        other.close()


def test_unknown_probe_set_names_the_registered_ones(store):
    with pytest.raises(UnknownProbeSet, match="unknown probe set 'x'; the store has none"):
        store.probe_set("x")
    store.register_probe_set("a", ProbeSet.from_sequences([[1]]))
    store.register_probe_set("b", ProbeSet.from_sequences([[2]]))
    with pytest.raises(UnknownProbeSet, match="unknown probe set 'x'; registered probe sets: a, b"):
        store.probe_set("x")


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".hidden", "x" * 201, 7, "a\nb"])
def test_probe_set_names_outside_the_safe_alphabet_are_refused(store, name):
    with pytest.raises(ProbeSetError, match="invalid probe set name"):
        store.register_probe_set(name, ProbeSet.from_sequences([[1]]))
    assert not (store.root / "probe_sets").exists() or not any((store.root / "probe_sets").iterdir())


@pytest.mark.parametrize("bad, msg", [([], "at least one sequence"), ([[]], "sequence 0 must be a non-empty"),
                                      ([[1.5]], "sequence 0 must be a non-empty"), ([[-1]], "outside 0..2\\*\\*31-1")])
def test_bad_sequences_are_refused(bad, msg):
    with pytest.raises(ProbeSetError, match=msg):
        ProbeSet.from_sequences(bad)


def test_frames_and_segments_written_before_the_probe_set_column_still_load_and_query(store):
    n = 4
    old = pa.table({**{f.name: pa.array([0] * n, f.type) for f in TOKEN_STATS if f.name not in ("run", "checkpoint",
                                                                                               "domain", "phase",
                                                                                               "probe_set", "logsumexp")},
                    "run": ["old"] * n, "checkpoint": ["c0"] * n, "logsumexp": pa.array([1.0] * n, pa.float32()),
                    "domain": ["d"] * n, "phase": ["train"] * n})
    assert "probe_set" not in old.column_names
    assert conform("token_stats", old).column("probe_set").null_count == n
    assert store.write_frame(Frame(run="old", producer="p", seq=0, tables={"token_stats": old}, frame_id=uuid.uuid4().hex))
    got = store.sql("SELECT count(*) AS n, count(probe_set) AS tagged FROM token_stats", run="old")
    assert got.n.iloc[0] == n and got.tagged.iloc[0] == 0
