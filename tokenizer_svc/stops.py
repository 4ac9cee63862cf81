"""Stop-string matching over streamed text, holding back what could still become a stop string.

The caller pushes text deltas in order. The matcher returns the part that is safe to show: text
that can no longer be (part of) a stop string. The longest suffix that is a proper prefix of some
stop string is held back until the next delta decides it. The first match wins: the one that
ends earliest in the text, and among those the one that starts earliest (the longest), so that
with the stop string excluded no character of any stop string is ever shown.

Per push the work is O(len(delta) + held) per stop string; the held text is shorter than the
longest stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(slots=True)
class Pushed:
    """What one `push` produced."""

    text: str  # safe to show now; after a match, the text up to the match (and the stop, if included)
    stop: str | None = None  # the stop string that matched, if one did


class StopMatcher:
    """Finds the first occurrence of any of `stops` in pushed text.

    Args:
        stops: the stop strings; each non-empty (the service validates).
        include_stop: whether the text returned with a match ends with the stop string.
    """

    def __init__(self, stops: Sequence[str], *, include_stop: bool = False):
        assert all(stops), "stop strings must be non-empty"
        self._stops = tuple(dict.fromkeys(stops))  # deduplicated, order kept
        self._include = include_stop
        self._held = ""
        self.matched: str | None = None

    def push(self, text: str) -> Pushed:
        """Add the next piece of text. After a match, nothing more may be pushed."""
        assert self.matched is None, "push after a stop-string match"
        if not self._stops:
            return Pushed(text)
        buf = self._held + text
        match = self._first_match(buf)
        if match is not None:
            start, stop = match
            self.matched = stop
            self._held = ""
            return Pushed(buf[:start + len(stop)] if self._include else buf[:start], stop)
        hold = self._held_length(buf)
        self._held = buf[len(buf) - hold:] if hold else ""
        return Pushed(buf[:len(buf) - hold])

    def flush(self) -> str:
        """At the end of the text: what was held back (it can no longer become a stop string)."""
        held, self._held = self._held, ""
        return held

    def _first_match(self, buf: str) -> tuple[int, str] | None:
        # Every match that ends inside earlier text was found by an earlier push, so any match here
        # ends in the new text; str.find gives each stop string's earliest occurrence.
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self._stops:
            start = buf.find(stop)
            if start >= 0:
                key = (start + len(stop), start, stop)
                if best is None or key[:2] < best[:2]:
                    best = key
        return None if best is None else (best[1], best[2])

    def _held_length(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stops:
            # Candidate starts are occurrences of the stop's first character among buf's last
            # len(stop) - 1 characters; the earliest one that works is the longest suffix.
            pos = buf.find(stop[0], max(len(buf) - len(stop) + 1, 0))
            while pos >= 0 and len(buf) - pos > longest:
                if stop.startswith(buf[pos:]):
                    longest = len(buf) - pos
                    break
                pos = buf.find(stop[0], pos + 1)
        return longest
