"""One detokenization stream: generated ids in, safe text deltas and the first stop match out.

Pure logic, no gRPC: the service's DetokenizeStream drives one StreamDetokenizer per stream, and
the tests drive it directly for the property checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer

from tokenizer_svc.detokenizer import IncrementalDetokenizer
from tokenizer_svc.stops import StopMatcher
from tokenizer_svc.token_bytes import ByteDetokenizer, TokenBytes


@dataclass(slots=True)
class StreamStep:
    """The answer to one batch of ids (or to the finish)."""

    text: str  # new text since the previous step
    num_tokens: int  # generated ids received so far, this batch included
    stop: str | None = None  # the stop string that matched, on the step that matched
    stop_token_index: int | None = None  # index among generated ids of the id that completed it
    done: bool = False  # the stream is over (a stop matched, or finish)


class StreamDetokenizer:
    """Incremental detokenizer plus stop matcher for one generation.

    Args:
        tokenizer: the `tokenizers` tokenizer (shared, read-only).
        prompt_ids: the prompt, for the first generated token's leading space.
        stops: stop strings (validated by the caller: non-empty).
        include_stop: end the text with the matched stop string instead of cutting before it.
        skip_special_tokens: drop special tokens from the text.
        special_ids: the tokenizer's special ids (computed once by the caller, not per stream).
        token_bytes: the tokenizer's byte table (TokenBytes.build, once by the caller), or None to
            re-decode a window per token instead.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), *, stops: Sequence[str] = (),
                 include_stop: bool = False, skip_special_tokens: bool = True,
                 special_ids: frozenset[int] | None = None, token_bytes: TokenBytes | None = None):
        if token_bytes is not None:
            self._detok = ByteDetokenizer(token_bytes, prompt_ids, skip_special_tokens=skip_special_tokens,
                                          special_ids=special_ids or frozenset())
        else:
            self._detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip_special_tokens,
                                                 special_ids=special_ids)
        self._matcher = StopMatcher(stops, include_stop=include_stop)
        self._has_stops = bool(stops)
        self.num_tokens = 0
        self.done = False

    def feed(self, ids: Sequence[int]) -> StreamStep:
        """Add a batch of generated ids. Ids after the one that completes a stop string are counted
        but produce no text."""
        assert not self.done, "feed after the stream ended"
        if not self._has_stops:  # no token index to report: the batch in one go
            self.num_tokens += len(ids)
            return StreamStep(self._detok.extend(ids), self.num_tokens)
        parts: list[str] = []
        for i, token_id in enumerate(ids):
            index = self.num_tokens + i
            pushed = self._matcher.push(self._detok.step(token_id))
            parts.append(pushed.text)
            if pushed.stop is not None:
                self.num_tokens += len(ids)
                self.done = True
                return StreamStep("".join(parts), self.num_tokens, pushed.stop, index, done=True)
        self.num_tokens += len(ids)
        return StreamStep("".join(parts), self.num_tokens)

    def finish(self) -> StreamStep:
        """The generation ended: release held text. A stop string can still complete here, when
        the held-back bytes of the last token decode to its final characters."""
        assert not self.done, "finish after the stream ended"
        self.done = True
        pushed = self._matcher.push(self._detok.flush())
        if pushed.stop is not None:
            return StreamStep(pushed.text, self.num_tokens, pushed.stop, max(self.num_tokens - 1, 0), done=True)
        return StreamStep(pushed.text + self._matcher.flush(), self.num_tokens, done=True)
