"""Incremental detokenization without decoding: each id's bytes looked up, joined, UTF-8 decoded
incrementally. O(1) per token, whatever the window or the sequence length.

It applies to tokenizers whose decoder only concatenates per-token bytes, which covers the common
families:
  * byte-level BPE (GPT-2, Llama 3, Qwen): each character of a token stands for one byte;
  * SentencePiece as `tokenizers` spells it (Llama 2, Mistral): Replace("▁", " "), ByteFallback
    ("<0xHH>" is byte HH), Fuse, Strip(" ", 1, 0) (the text's first space is dropped);
  * Metaspace (its decoder drops the space of the text's first token).
The only start-of-text effect in these is one leading space dropped, applied here to the first byte
of the whole text (prompt included). Any other decoder (WordPiece's "##" and cleanup rules, a
decoder that joins tokens with spaces, ...) gets no table, and the window detokenizer
(tokenizer_svc.detokenizer) is used instead.

The table is built once per tokenizer and checked against the tokenizer's own decode: every id
whose bytes are valid UTF-8 alone must decode, after a plain anchor token, to exactly the anchor's
text followed by its bytes; one mismatch and no table is used. Added tokens take their text from
decode itself.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Sequence

from tokenizers import Tokenizer

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SPIECE = "\u2581"


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: printable character -> the byte it stands for."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _piece_rule(decoder: dict | None):
    """(token text -> bytes, strips the text's first space) for a decoder we can tabulate, else None."""
    if decoder is None:
        return None
    kind = decoder.get("type")
    if kind == "ByteLevel":
        table = _byte_level_decoder()
        return (lambda tok: bytes(table[c] for c in tok) if all(c in table for c in tok) else None), False
    if kind == "Metaspace":
        rep = decoder.get("replacement", _SPIECE)
        return (lambda tok: tok.replace(rep, " ").encode()), decoder.get("prepend_scheme", "always") != "never"
    if kind != "Sequence":
        return None
    replace, byte_fallback, strip = None, False, False
    for step in decoder.get("decoders", []):
        t = step.get("type")
        if t == "Replace" and "String" in step.get("pattern", {}) and replace is None:
            replace = (step["pattern"]["String"], step["content"])
        elif t == "ByteFallback":
            byte_fallback = True
        elif t == "Fuse":
            pass
        elif t == "Strip" and step.get("content") == " " and step.get("start", 0) <= 1 and not step.get("stop"):
            strip = step.get("start", 0) == 1
        else:
            return None

    def piece(tok: str) -> bytes:
        if byte_fallback and (m := _BYTE_TOKEN.fullmatch(tok)):
            return bytes([int(m.group(1), 16)])
        return (tok.replace(*replace) if replace else tok).encode()
    return piece, strip


class TokenBytes:
    """Per-id bytes of one tokenizer, as they appear in the middle of a text."""

    __slots__ = ("pieces", "strips_first_space")

    def __init__(self, pieces: list[bytes], strips_first_space: bool):
        self.pieces = pieces
        self.strips_first_space = strips_first_space

    @classmethod
    def build(cls, tokenizer: Tokenizer) -> "TokenBytes | None":
        """The table, or None when the tokenizer's decoder is not a plain concatenation of bytes."""
        rule = _piece_rule(json.loads(tokenizer.to_str()).get("decoder"))
        if rule is None:
            return None
        piece_of, strips = rule
        added = tokenizer.get_added_tokens_decoder()
        size = max([tokenizer.get_vocab_size(with_added_tokens=True) - 1, *added]) + 1
        pieces: list[bytes | None] = []
        for i in range(size):
            tok = tokenizer.id_to_token(i)
            pieces.append(None if tok is None or i in added else piece_of(tok))
        anchor = next((i for i, p in enumerate(pieces) if p is not None and p.isascii() and p.isalpha()), None)
        if anchor is None:
            return None
        head = tokenizer.decode([anchor], skip_special_tokens=False)
        ids = list(range(size))
        texts = tokenizer.decode_batch([[anchor, i] for i in ids], skip_special_tokens=False)
        for i, text in zip(ids, texts):
            if i in added or pieces[i] is None:
                if not text.startswith(head) or "\ufffd" in text:
                    return None
                pieces[i] = text[len(head):].encode()
                continue
            try:
                expected = head + pieces[i].decode()
            except UnicodeDecodeError:
                continue  # part of a character: checked by the stream tests, not alone
            if text != expected:
                return None
        return cls(pieces, strips)


class ByteDetokenizer:
    """Token ids in, text deltas out, by table lookup (see the module docstring). Same contract as
    tokenizer_svc.detokenizer.IncrementalDetokenizer: the deltas concatenate to
    `decode(prompt + generated)[len(decode(prompt)):]`, and never end inside a UTF-8 character."""

    __slots__ = ("_pieces", "_skip", "_utf8", "_at_start")

    def __init__(self, table: TokenBytes, prompt_ids: Sequence[int] = (), *, skip_special_tokens: bool = True,
                 special_ids: frozenset[int] = frozenset()):
        self._pieces = table.pieces
        self._skip = special_ids if skip_special_tokens else frozenset()
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        # Until the text has a first byte, a leading space would be the one the decoder strips.
        self._at_start = table.strips_first_space
        if prompt_ids:
            self._feed_prompt(prompt_ids)

    def _feed_prompt(self, prompt_ids: Sequence[int]) -> None:
        # Only the prompt's unfinished last character matters (its text is the client's, not ours):
        # its bytes lie in the last 4 non-empty pieces, since a UTF-8 character spans at most 4 bytes.
        tail: list[int] = []
        for i in reversed(prompt_ids):
            if i not in self._skip and self._pieces[i]:
                tail.append(i)
                if len(tail) == 4:
                    break
        self._utf8.decode(self._join(tail[::-1]))

    def _join(self, ids: Sequence[int]) -> bytes:
        skip, pieces = self._skip, self._pieces
        data = b"".join([pieces[i] for i in ids if i not in skip])
        if self._at_start and data:
            self._at_start = False
            if data[:1] == b" ":
                data = data[1:]
        return data

    def step(self, token_id: int) -> str:
        """Add one generated id; return the text that became safe to show (may be "")."""
        if token_id in self._skip:
            return ""
        return self._utf8.decode(self._join((token_id,)))

    def extend(self, ids: Sequence[int]) -> str:
        """Add several ids at once: the concatenation of their step() results."""
        return self._utf8.decode(self._join(ids))

    def flush(self) -> str:
        """At the end of the sequence: an incomplete last character, as U+FFFD."""
        return self._utf8.decode(b"", final=True)
