"""Pending blocks: KV blocks the router has sent to an engine that the engine's reports do not show yet.

(Not the engine's `reserved_blocks`, which is growth the engine holds for its running requests; the
router calls its own correction "pending" everywhere: here, in Candidate.pending_blocks, in the
`kvmesh.route.pending_blocks` span attribute.)

Between two load reports an engine's free-block count is frozen in the router's view, while the
router keeps sending it work. Without correcting for that, a burst right after a report herds onto
the engine that looked emptiest. Each dispatched request therefore counts its need (prompt blocks
plus growth) as pending on its engine until a report is known to include it:

- the engine's first Generate response carries its load report (include_load); that report's
  `sequence` is the first one in which the request is counted, so every report with
  `sequence >= acked_sequence` reflects it and the entry is retired;
- an engine that attaches no report acknowledges with "the next report after the first response";
- a request that ends releases its entry (reports after that no longer hold its blocks; the
  report in hand may still count them, which errs on the safe side).

An entry is owned by one request and dropped exactly once, by `release()` in its `finally`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class PendingEntry:
    """Blocks one request was sent with, to one engine."""

    request_id: str
    num_blocks: int
    sent_at: float  # router monotonic clock at dispatch
    acked_sequence: int | None = None  # reports with sequence >= this include the request


@dataclass
class PendingLedger:
    """The pending blocks of one engine. Not thread-safe: used from the router's event loop only."""

    _live: dict[str, PendingEntry] = field(default_factory=dict)
    _acked: dict[str, PendingEntry] = field(default_factory=dict)  # live entries waiting for their report
    last_sequence: int = -1  # sequence of the newest report applied
    pending_blocks: int = 0  # sum over the live entries: blocks no report reflects yet

    def add(self, request_id: str, num_blocks: int) -> PendingEntry:
        assert request_id not in self._live, f"request {request_id} sent twice"
        entry = PendingEntry(request_id, num_blocks, time.monotonic())
        self._live[request_id] = entry
        self.pending_blocks += num_blocks
        return entry

    def ack(self, request_id: str, report_sequence: int | None) -> None:
        """The engine answered the request. `report_sequence` is the attached report's, if any."""
        entry = self._live.get(request_id)
        if entry is None or entry.acked_sequence is not None:
            return
        entry.acked_sequence = report_sequence if report_sequence is not None else self.last_sequence + 1
        if entry.acked_sequence <= self.last_sequence:
            self.release(request_id)
        else:
            self._acked[request_id] = entry

    def on_report(self, sequence: int) -> None:
        """A report with this sequence was applied: retire every entry it reflects."""
        self.last_sequence = sequence
        if self._acked:  # only acknowledged entries can retire: the scan skips the others
            for rid in [rid for rid, e in self._acked.items() if e.acked_sequence <= sequence]:
                self.release(rid)

    def release(self, request_id: str) -> None:
        entry = self._live.pop(request_id, None)
        if entry is not None:
            self._acked.pop(request_id, None)
            self.pending_blocks -= entry.num_blocks

    def reset(self) -> None:
        """The engine restarted (new engine id or sequence went back): forget the old numbering."""
        self.last_sequence = -1
        self._acked.clear()
        for entry in self._live.values():
            entry.acked_sequence = None

    def __len__(self) -> int:
        return len(self._live)
