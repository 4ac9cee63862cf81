"""Which prompt prefixes each engine replica holds in its prefix cache, as the router knows it.

Two sources per replica, both keyed by the block hashes of kvmesh/prefix_hash.py (the router hashes
a prompt's token ids exactly as the engine does):

- **events** (exact): the engine's SubscribeKvEvents stream, a snapshot and then every stored and
  removed block (router/kv_events.py feeds it). Trusted while the stream is up and delivered a batch
  or a heartbeat within the staleness bound.
- **routed** (approximate): the blocks of the prompts this router itself sent to the replica, most
  recent last, bounded by the replica's block count and forgotten after `approx_ttl_s`. It stands in
  when events are missing (an engine without the capability, a stream down or stale), and it covers
  the short gap between sending a prompt and the engine's "stored" event for it (`pending_s`), so
  that a burst of one new prefix does not scatter before the first request's events arrive.

A match is the number of LEADING blocks of the prompt the replica holds: a block hash names its
whole prefix, and the engine can only reuse an unbroken prefix.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

SOURCE_EVENTS = "events"
SOURCE_ROUTED = "routed"  # the approximate index of the router's own decisions
SOURCE_NONE = "none"  # prefix caching off on the engine: nothing can match


@dataclass
class ReplicaIndex:
    """One replica's cached block hashes. Mutated on the router's event loop only."""

    address: str
    prefix_caching: bool = True  # False: the engine does not cache prefixes (no matches at all)
    stored: set[int] = field(default_factory=set)  # from events
    engine_id: str = ""
    sequence: int = -1  # of the last batch applied
    events_up: bool = False  # a snapshot arrived on the current stream
    last_event_at: float = 0.0  # router monotonic clock of the last batch or heartbeat
    routed: OrderedDict[int, float] = field(default_factory=OrderedDict)  # hash -> when sent, LRU first
    capacity: int = 1 << 16  # bound on `routed`: the engine's block count once known

    def events_fresh(self, now: float, staleness_s: float) -> bool:
        return self.events_up and now - self.last_event_at <= staleness_s

    def apply_snapshot(self, engine_id: str, sequence: int, hashes: Sequence[int], now: float) -> None:
        self.stored = set(hashes)
        self.engine_id, self.sequence = engine_id, sequence
        self.events_up, self.last_event_at = True, now

    def apply_batch(self, sequence: int, stored: Sequence[Sequence[int]], removed: Sequence[Sequence[int]],
                    now: float) -> None:
        """Apply one non-snapshot batch whose sequence follows the last (the caller checked)."""
        for hashes in stored:
            self.stored.update(hashes)
        for hashes in removed:
            self.stored.difference_update(hashes)
        self.sequence, self.last_event_at = sequence, now

    def heartbeat(self, now: float) -> None:
        self.last_event_at = now

    def events_lost(self) -> None:
        """The stream ended: fall back to the routed index until a new snapshot arrives."""
        self.events_up = False

    def note_routed(self, hashes: Sequence[int], now: float) -> None:
        routed = self.routed
        for h in hashes:
            routed[h] = now
            routed.move_to_end(h)
        while len(routed) > self.capacity:
            routed.popitem(last=False)

    def match(self, hashes: Sequence[int], now: float, *, staleness_s: float, pending_s: float,
              approx_ttl_s: float) -> tuple[int, str]:
        """(leading blocks of `hashes` held here, the source that said so)."""
        if not self.prefix_caching:
            return 0, SOURCE_NONE
        routed = self.routed
        if self.events_fresh(now, staleness_s):
            stored, n = self.stored, 0
            for h in hashes:
                if h not in stored and now - routed.get(h, -1e18) > pending_s:
                    break
                n += 1
            return n, SOURCE_EVENTS
        n = 0
        for h in hashes:
            if now - routed.get(h, -1e18) > approx_ttl_s:
                break
            n += 1
        return n, SOURCE_ROUTED


@dataclass
class PrefixIndex:
    """Every replica's index, by engine address (the key of the router's engine table).

    Args:
        staleness_s: events older than this (no batch, no heartbeat) are not trusted.
        pending_s: how long a prompt the router sent counts as held before its stored event arrives.
        approx_ttl_s: how long the routed index trusts its own decisions without events.
    """

    staleness_s: float = 2.0
    pending_s: float = 5.0
    approx_ttl_s: float = 300.0
    replicas: dict[str, ReplicaIndex] = field(default_factory=dict)

    def replica(self, address: str) -> ReplicaIndex:
        index = self.replicas.get(address)
        if index is None:
            index = self.replicas[address] = ReplicaIndex(address)
        return index

    def forget(self, address: str) -> None:
        self.replicas.pop(address, None)

    def match(self, address: str, hashes: Sequence[int], now: float | None = None) -> tuple[int, str]:
        if not hashes:
            return 0, SOURCE_NONE
        index = self.replicas.get(address)
        if index is None:
            return 0, SOURCE_ROUTED
        return index.match(hashes, time.monotonic() if now is None else now, staleness_s=self.staleness_s,
                           pending_s=self.pending_s, approx_ttl_s=self.approx_ttl_s)

    def note_routed(self, address: str, hashes: Sequence[int], now: float | None = None) -> None:
        if hashes:
            self.replica(address).note_routed(hashes, time.monotonic() if now is None else now)
