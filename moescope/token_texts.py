"""The text of token ids, recorded with a run so that pages show each expert's top tokens as text.

The probe asks the tokenizer given at attach time (a Hugging Face tokenizer, a `tokenizers`
Tokenizer, or any object with decode / convert_ids_to_tokens / id_to_token) for the text of
each token id the first time its producer's rows carry that id, and sends the new pairs in
the frame's meta as "token_texts": [[id, text], ...]. The store keeps the first text of each
(run, id). The reference model reads bytes: ByteTokenizer is its tokenizer.

A frame's pairs are hostile input like the rest of its header: `check_entries` bounds them.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

log = logging.getLogger("moescope.probe")

MAX_TEXT_CHARS = 48               # a token's text is cut to this many characters
MAX_TEXTS_PER_FRAME = 32_768      # pairs one frame carries: even escaped, far below the header's 16 MiB
MAX_TEXTS_PER_PRODUCER = 1 << 20  # ids one producer looks up (today's vocabularies hold at most ~256k)
MAX_TEXTS_PER_RUN = 1 << 22       # pairs the store keeps per run, whatever producers send
MAX_TOKEN_ID = 2**31 - 1          # token_id is int32 in the record
_METHODS = ("decode", "batch_decode", "decode_batch", "convert_ids_to_tokens", "id_to_token")


class ByteTokenizer:
    """The reference model's tokenizer: each token id is one byte of UTF-8 text (moescope.corpus)."""

    vocab_size = 256

    def __call__(self, text: str) -> list[int]:
        """Text -> ids, so the same object builds probe sets (ProbeSet.from_texts)."""
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def convert_ids_to_tokens(self, ids):
        """Printable ASCII as itself; other bytes (controls, pieces of multi-byte characters) as <0xNN>."""
        one = lambda i: chr(i) if 32 <= i < 127 else f"<0x{i:02X}>"  # noqa: E731
        return one(int(ids)) if np.ndim(ids) == 0 else [one(int(i)) for i in ids]


def check_tokenizer(tokenizer: Any) -> None:
    if not any(callable(getattr(tokenizer, m, None)) for m in _METHODS):
        raise TypeError(f"tokenizer must have one of {', '.join(_METHODS)} (a Hugging Face tokenizer, a tokenizers "
                        f"Tokenizer, or moescope.token_texts.ByteTokenizer), got {type(tokenizer).__name__}")


def _readable(text) -> bool:
    # U+FFFD: the id is a piece of a multi-byte character, which decodes to nothing readable alone.
    return isinstance(text, str) and text != "" and "\ufffd" not in text and "\x00" not in text


def _clean(text) -> str | None:
    if not isinstance(text, str) or not text:
        return None
    text = text.encode("utf-8", errors="replace").decode("utf-8").replace("\x00", "\u2400")  # no lone surrogates, no NUL
    return text if len(text) <= MAX_TEXT_CHARS else text[: MAX_TEXT_CHARS - 1] + "…"


def _decoded(tokenizer, ids: list[int]) -> list:
    batch = getattr(tokenizer, "batch_decode", None) or getattr(tokenizer, "decode_batch", None)
    if callable(batch):
        return list(batch([[i] for i in ids]))
    decode = getattr(tokenizer, "decode", None)
    return [decode([i]) for i in ids] if callable(decode) else [None] * len(ids)


def _tokens(tokenizer, ids: list[int]) -> list:
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    if callable(convert):
        return list(convert(ids))
    one = getattr(tokenizer, "id_to_token", None)
    return [one(i) for i in ids] if callable(one) else [None] * len(ids)


def texts_for(tokenizer, ids) -> dict[int, str]:
    """id -> text: what the id decodes to alone, or its vocabulary entry where that is not readable
    (a byte of a multi-byte character, an id decode skips); ids with neither are left out."""
    ids = [int(i) for i in ids]
    decoded = _decoded(tokenizer, ids)
    unreadable = [i for i, text in zip(ids, decoded) if not _readable(text)]
    entries = dict(zip(unreadable, _tokens(tokenizer, unreadable))) if unreadable else {}
    out = {}
    for i, text in zip(ids, decoded):
        text = _clean(text if _readable(text) else entries.get(i))
        if text is not None:
            out[i] = text
    return out


def check_entries(entries: Any) -> None:
    """A frame's "token_texts": a list of [token id, text] pairs within the bounds above; ValueError otherwise."""
    if not isinstance(entries, list) or len(entries) > MAX_TEXTS_PER_FRAME:
        raise ValueError(f"frame meta 'token_texts' must be a list of at most {MAX_TEXTS_PER_FRAME} [id, text] pairs")
    for entry in entries:
        ok = (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], int) and not isinstance(entry[0], bool)
              and 0 <= entry[0] <= MAX_TOKEN_ID and isinstance(entry[1], str) and 0 < len(entry[1]) <= MAX_TEXT_CHARS
              and "\x00" not in entry[1])
        if ok:
            try:
                entry[1].encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate: no database stores it
                ok = False
        if not ok:
            raise ValueError(f"frame meta 'token_texts' entry {str(entry)[:120]} is not [token id 0..{MAX_TOKEN_ID}, "
                             f"text of 1..{MAX_TEXT_CHARS} characters]")


class TextRecorder:
    """One producer's id -> text pairs still to send: each id is looked up once, when its rows first carry it.

    Runs on the probe's background thread; a failing tokenizer is logged once and then left alone.
    """

    def __init__(self, tokenizer: Any):
        check_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self._seen: set[int] = set()
        self._pending: dict[int, str] = {}
        self.failed = False

    def add(self, token_ids: np.ndarray) -> None:
        if self.failed:
            return
        room = MAX_TEXTS_PER_PRODUCER - len(self._seen)
        new = [i for i in np.unique(token_ids).tolist() if 0 <= i <= MAX_TOKEN_ID and i not in self._seen][:max(room, 0)]
        if not new:
            return
        self._seen.update(new)
        try:
            self._pending.update(texts_for(self.tokenizer, new))
        except Exception as exc:  # noqa: BLE001 - a user's tokenizer must not stop the recording
            self.failed = True
            log.warning("moescope probe: the tokenizer failed (%s: %s); token text is no longer recorded",
                        type(exc).__name__, str(exc)[:200])

    def take(self) -> list[list]:
        """Up to MAX_TEXTS_PER_FRAME pending pairs for the next frame (the rest wait for the frames after)."""
        ids = list(self._pending)[:MAX_TEXTS_PER_FRAME]
        return [[i, self._pending.pop(i)] for i in ids]

    def give_back(self, entries: list) -> None:
        """Pairs of a frame the sink did not take go with the next one."""
        for i, text in entries or ():
            self._pending.setdefault(i, text)
