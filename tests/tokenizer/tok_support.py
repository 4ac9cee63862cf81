"""Shared test values for the tokenizer tier: small limits, and hypothesis strategies for text that exercises the tokenizer: byte-fallback characters (accents,
CJK, emoji, which stories260k's 512-piece vocabulary splits into byte tokens), whitespace runs and
special-token look-alikes."""

from __future__ import annotations

from hypothesis import strategies as st

from tokenizer_svc.limits import TokenizerLimits

# Small limits so that the limit tests need no megabytes of input.
TEST_LIMITS = TokenizerLimits(max_text_bytes=4096, max_ids_per_request=1000, max_stop_strings=4, max_stop_string_bytes=16)
TEST_MAX_MESSAGE_BYTES = 64 * 1024

PIECES = ["Once", " upon", " a time", "Lily", " the", "dog", ".", ",", "!", " ", "  ", "\n", "\t",
          "é", "ü", "ß", "€", "中文", "日本", "😀", "🐸", "👍🏽", "🇫🇷", "e\u0301", "<s>", "</s>", "<unk>",
          "stop", "STOP", "###"]

# Any character except surrogates and U+2581 (which stories260k's tokenizer reads as a space, by
# design of SentencePiece: it would not round-trip).
_CHARS = st.characters(codec="utf-8", exclude_characters="\u2581")

texts = st.lists(st.one_of(st.sampled_from(PIECES), st.text(_CHARS, min_size=1, max_size=4)),
                 min_size=1, max_size=12).map("".join)
