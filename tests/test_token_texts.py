"""Token texts: what the probe asks a tokenizer, the bounds a frame's pairs are held to, the recorder's budget."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from moescope import token_texts as tt
from moescope.frame import MAGIC, Frame, FrameError, decode, encode
from moescope.schema import EXPERT_STEP


def test_the_reference_models_bytes_read_as_characters_and_the_rest_as_byte_tokens():
    assert tt.texts_for(tt.ByteTokenizer(), [97, 32, 10, 0, 200]) == {97: "a", 32: " ", 10: "\n", 0: "<0x00>",
                                                                       200: "<0xC8>"}
    assert tt.ByteTokenizer()("é") == [0xC3, 0xA9] and tt.ByteTokenizer().decode([0xC3, 0xA9]) == "é"


class _Vocab:
    """A tokenizer with only a vocabulary lookup (like tokenizers.Tokenizer.id_to_token) and a lossy decode."""

    def decode(self, ids):
        return "" if ids[0] == 3 else f"w{ids[0]}"

    def id_to_token(self, i):
        return "<pad>" if i == 3 else f"tok{i}"


def test_ids_that_decode_to_nothing_readable_fall_back_to_their_vocabulary_entry():
    assert tt.texts_for(_Vocab(), [1, 3]) == {1: "w1", 3: "<pad>"}
    long = type("Long", (), {"decode": lambda self, ids: "x" * 500})()
    text = tt.texts_for(long, [5])[5]
    assert len(text) == tt.MAX_TEXT_CHARS and text.endswith("…")
    assert tt.texts_for(type("Nul", (), {"decode": lambda self, ids: "\x00"})(), [0]) == {}
    with pytest.raises(TypeError, match="tokenizer must have one of decode"):
        tt.check_tokenizer(object())


def _header_meta(meta) -> bytes:
    """A valid frame whose header meta is replaced as a hostile producer would, past any encoder check."""
    table = pa.Table.from_pydict({
        "run": ["r"], "checkpoint": ["c"], "step": [1], "rank": [0], "layer": [0], "expert": [0], "num_tokens": [1],
        "tokens": [1], "dropped": [0], "top1": [1], "prob_sum": [1.0], "weight_sum": [1.0], "phase": ["train"]},
        schema=EXPERT_STEP)
    data = encode(Frame(run="r", producer="p", seq=0, tables={"expert_step": table}))
    hlen = int.from_bytes(data[4:8], "little")
    header = json.loads(data[8:8 + hlen])
    header["meta"] = meta
    new = json.dumps(header).encode()
    return MAGIC + len(new).to_bytes(4, "little") + new + data[8 + hlen:]


@pytest.mark.parametrize("entries", [
    {"1": "a"}, [[1]], [["1", "a"]], [[True, "a"]], [[-1, "a"]], [[2**31, "a"]], [[1, ""]], [[1, 5]],
    [[1, "x" * (tt.MAX_TEXT_CHARS + 1)]], [[1, "a\x00"]], [[1, "\ud800"]], [[i, "a"] for i in range(tt.MAX_TEXTS_PER_FRAME + 1)],
])
def test_hostile_token_texts_in_a_frame_are_refused_with_the_reason(entries):
    with pytest.raises(FrameError, match="token_texts"):
        decode(_header_meta({"token_texts": entries}))


def test_good_token_texts_pass_the_frame_check():
    entries = [[0, "<0x00>"], [97, "a"], [2**31 - 1, "é" * tt.MAX_TEXT_CHARS]]
    assert decode(_header_meta({"token_texts": entries})).meta["token_texts"] == entries


def test_the_recorder_looks_each_id_up_once_and_sends_them_in_bounded_frames(monkeypatch):
    calls = []

    class Counting(tt.ByteTokenizer):
        def decode(self, ids):
            calls.append(list(ids))
            return super().decode(ids)

    monkeypatch.setattr(tt, "MAX_TEXTS_PER_FRAME", 3)
    rec = tt.TextRecorder(Counting())
    rec.add(np.array([97, 98, 97, -1, 99, 100]))
    rec.add(np.array([98, 101]))
    assert sorted(i for (i,) in calls) == [97, 98, 99, 100, 101]  # -1 (unknown id) is not looked up
    first = rec.take()
    assert first == [[97, "a"], [98, "b"], [99, "c"]]
    rec.give_back(first)  # the sink did not take that frame
    assert [i for i, _ in rec.take()] == [100, 101, 97] and [i for i, _ in rec.take()] == [98, 99] and rec.take() == []


def test_a_failing_tokenizer_is_left_alone_after_one_warning(caplog):
    class Broken:
        def decode(self, ids):
            raise RuntimeError("no vocab file")

    rec = tt.TextRecorder(Broken())
    rec.add(np.array([1, 2]))
    rec.add(np.array([3]))
    assert rec.failed and rec.take() == []
    assert [r.message for r in caplog.records].count(
        "moescope probe: the tokenizer failed (RuntimeError: no vocab file); token text is no longer recorded") == 1
