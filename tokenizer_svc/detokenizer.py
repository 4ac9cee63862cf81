"""Incremental detokenization by re-decoding a short window: token ids in, text deltas out, never
half a UTF-8 character. For any tokenizer; those whose decoder only concatenates per-token bytes
(most) use the table lookup of tokenizer_svc.token_bytes instead, which decodes nothing per token.

The technique is vLLM's and TGI's prefix-offset / read-offset window. Decoding a token on its own
is wrong for most tokenizers (SentencePiece drops a leading space at the start of a decode, a
character may be split across byte-fallback or byte-level tokens), and re-decoding the whole
sequence at every step costs O(length). Instead we keep a short window of ids:

    ids:     ... | prefix (already emitted) | held (not yet emitted) | new id
                 ^prefix                    ^read

and decode only the window (about MAX_WINDOW_TOKENS ids plus the held ones). The text of the new
tokens is the window's text minus the text of its prefix part, which the caller already has.
Start-of-text effects (a stripped leading space) apply to the prefix part and the whole window
alike, so they cancel. When the window's text ends with
U+FFFD the last character is incomplete: we hold the tokens back until it completes.

Two conditions keep the window's difference equal to the difference of full decodes:
  * no skipped id enters the window (a prompt ending in a run of special ids would otherwise
    give a window whose prefix part decodes to nothing, and the first generated token's leading
    space would be stripped as if it began the text);
  * the window begins on a character boundary (its text does not start with U+FFFD).

For ids whose bytes are not valid UTF-8 the stream replaces the bad bytes by U+FFFD, but it can
differ from a one-shot decode in how many: `tokenizers` replaces a whole run of byte tokens once
any byte in it is bad, which can change text already emitted. Tokenized text never hits this.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens put in the first window: enough context for leading-space rules.
INITIAL_PROMPT_WINDOW = 5
# How far back into the prompt to look for a clean window start (a character boundary, a token
# that is not skipped) before giving up and starting where we are.
MAX_PROMPT_LOOKBACK = 64
# The window is trimmed back to the last emitted ids once it holds more than this many: a longer
# window costs a little more per decode, trimming costs one extra decode.
MAX_WINDOW_TOKENS = 12
# A UTF-8 character spans at most 4 bytes, so after this many held tokens a trailing U+FFFD is a
# bad byte, not an incomplete character: emit it rather than re-decode an ever-growing window.
MAX_HELD_TOKENS = 16


def special_token_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """The ids that `decode(..., skip_special_tokens=True)` drops."""
    return frozenset(i for i, tok in tokenizer.get_added_tokens_decoder().items() if tok.special)


class IncrementalDetokenizer:
    """Turns a stream of generated ids into text deltas whose concatenation equals
    `decode(prompt + generated)[len(decode(prompt)):]` (for text that is valid UTF-8).

    Each `step` costs one decode of a window of a few tokens, whatever the sequence length; `extend`
    one decode per batch.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), *,
                 skip_special_tokens: bool = True, special_ids: frozenset[int] | None = None):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._special = special_token_ids(tokenizer) if special_ids is None else special_ids
        # Skipped ids change nothing in a decode, so they never enter the window: every id in it
        # survives decoding, and the prefix part always carries the start-of-text effects.
        prompt = [t for t in prompt_ids if not self._skipped(t)]
        self._ids: list[int] = prompt[self._prompt_window_start(prompt):]  # the window
        self._read = len(self._ids)  # window index of the first id whose text is not emitted yet
        self._prefix_text = self._decode(self._ids)  # text of the prefix part, _ids[:_read]

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def _skipped(self, token_id: int) -> bool:
        return self._skip and token_id in self._special

    def _prompt_window_start(self, prompt: Sequence[int]) -> int:
        start = max(len(prompt) - INITIAL_PROMPT_WINDOW, 0)
        limit = max(len(prompt) - MAX_PROMPT_LOOKBACK, 0)
        while start > limit and self._decode(prompt[start:]).startswith(REPLACEMENT_CHAR):
            start -= 1
        return start

    def step(self, token_id: int) -> str:
        """Add one generated id; return the text that became safe to show (may be "")."""
        if self._skipped(token_id):
            return ""
        self._ids.append(token_id)
        text = self._decode(self._ids)
        held = len(self._ids) - self._read
        if len(text) <= len(self._prefix_text) or (text.endswith(REPLACEMENT_CHAR) and held < MAX_HELD_TOKENS):
            return ""
        return self._emit(text)

    def extend(self, ids: Sequence[int]) -> str:
        """Add several ids at once: the concatenation of their step() results, for one decode of the
        window per batch instead of one per id (plus one to trim a long window). A batch whose text
        ends inside a character is stepped id by id instead, so that what precedes it is not held."""
        kept = [i for i in ids if not self._skipped(i)]
        if len(kept) <= 1:
            return self.step(kept[0]) if kept else ""
        before = len(self._ids)
        self._ids.extend(kept)
        text = self._decode(self._ids)
        if text.endswith(REPLACEMENT_CHAR):
            del self._ids[before:]
            return "".join([self.step(i) for i in kept])
        if len(text) <= len(self._prefix_text):  # nothing visible yet (ids that decode to no text)
            return ""
        return self._emit(text)

    def _emit(self, text: str) -> str:
        delta = text[len(self._prefix_text):]
        if len(self._ids) > MAX_WINDOW_TOKENS:
            # Trim: the ids just emitted become the prefix part, older ones leave the window. This
            # costs a decode of the new prefix part, so it is done only once the window is long.
            del self._ids[:self._read]
            self._prefix_text = self._decode(self._ids)
        else:
            self._prefix_text = text  # the whole window is emitted now: its text is the prefix text
        self._read = len(self._ids)
        return delta

    def flush(self) -> str:
        """At the end of the sequence: the text still held back (an incomplete character as U+FFFD)."""
        if self._read == len(self._ids):
            return ""
        return self._emit(self._decode(self._ids))
