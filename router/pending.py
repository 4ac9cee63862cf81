"""In-flight reservations: KV blocks the router has sent to an engine that its reports do not show yet.

Between two load reports an engine's free-block count is frozen in the router's view, while the
router keeps sending it work. Without correcting for that, a burst right after a report herds onto
the engine that looked emptiest. Each dispatched request therefore reserves its need (prompt blocks
plus growth) on its engine until a report is known to include it:

- the engine's first Generate response carries its load report (include_load); that report's
  `sequence` is the first one in which the request is counted, so every report with
  `sequence >= acked_sequence` reflects it and the reservation is retired;
- an engine that attaches no report acknowledges with "the next report after the first response";
- a request that ends releases its reservation (reports after that no longer hold its blocks; the
  report in hand may still count them, which errs on the safe side).

A reservation is owned by one request and dropped exactly once, by `release()` in its `finally`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class Reservation:
    """Blocks promised to one request on one engine."""

    request_id: str
    num_blocks: int
    sent_at: float  # router monotonic clock at dispatch
    acked_sequence: int | None = None  # reports with sequence >= this include the request


@dataclass
class ReservationLedger:
    """The reservations of one engine. Not thread-safe: used from the router's event loop only."""

    _live: dict[str, Reservation] = field(default_factory=dict)
    last_sequence: int = -1  # sequence of the newest report applied

    def reserve(self, request_id: str, num_blocks: int) -> Reservation:
        assert request_id not in self._live, f"request {request_id} reserved twice"
        res = Reservation(request_id, num_blocks, time.monotonic())
        self._live[request_id] = res
        return res

    def ack(self, request_id: str, report_sequence: int | None) -> None:
        """The engine answered the request. `report_sequence` is the attached report's, if any."""
        res = self._live.get(request_id)
        if res is None or res.acked_sequence is not None:
            return
        res.acked_sequence = report_sequence if report_sequence is not None else self.last_sequence + 1
        if res.acked_sequence <= self.last_sequence:
            del self._live[request_id]

    def on_report(self, sequence: int) -> None:
        """A report with this sequence was applied: retire every reservation it reflects."""
        self.last_sequence = sequence
        done = [rid for rid, r in self._live.items()
                if r.acked_sequence is not None and r.acked_sequence <= sequence]
        for rid in done:
            del self._live[rid]

    def release(self, request_id: str) -> None:
        self._live.pop(request_id, None)

    def reset(self) -> None:
        """The engine restarted (new engine id or sequence went back): forget the old numbering."""
        self.last_sequence = -1
        for res in self._live.values():
            res.acked_sequence = None

    @property
    def pending_blocks(self) -> int:
        """Blocks reserved here that no report reflects yet."""
        return sum(r.num_blocks for r in self._live.values())

    def __len__(self) -> int:
        return len(self._live)
