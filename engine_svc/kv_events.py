"""KV events for routers: the engine's stored/removed block hashes as numbered batches, with a
snapshot first for a subscriber that joins late (kvmesh.v1.Engine/SubscribeKvEvents).

    engine thread                       event loop (this module)
    -------------                       ------------------------
    BlockManager appends BlocksStored / drain() after every step: pops the deque, applies the events
    BlocksRemoved to a deque       -->  to `hashes` (what the engine holds), numbers them as one
                                        batch and hands it to every subscriber's queue

The engine thread never waits: it only appends to a deque. The publisher's `hashes` is the set of
every hash stored and not removed by the events drained so far, so "snapshot, then every batch
after it" is exactly the engine's state at each step boundary. A subscriber whose queue fills up
(a router that stopped reading) is not waited for: its queue is replaced by a fresh snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from engine_svc.core.prefix_cache import BlocksRemoved, BlocksStored, KvEvent
from kvmesh.v1 import engine_pb2

log = logging.getLogger(__name__)

MAX_QUEUED_BATCHES = 1024  # per subscriber; beyond it the subscriber gets a snapshot instead


class _Subscriber:
    __slots__ = ("queue", "lagged")

    def __init__(self):
        self.queue: deque[engine_pb2.KvEventBatch] = deque()
        self.lagged = False  # fell behind: the next message is a fresh snapshot


class KvEventPublisher:
    """Numbers the engine's KV events and fans them out. Used on the event loop only.

    Args:
        events: the deque the block manager appends to (BlockManager.enable_events()).
        engine_id, block_size: stamped on every batch.
    """

    def __init__(self, events: deque[KvEvent], engine_id: str, block_size: int):
        self._events = events
        self.engine_id = engine_id
        self.block_size = block_size
        self.hashes: set[int] = set()
        self.sequence = 0
        self._subscribers: set[_Subscriber] = set()
        self._changed = asyncio.Event()

    @property
    def num_subscribers(self) -> int:
        return len(self._subscribers)

    def drain(self) -> None:
        """Take every event the engine recorded since the last drain: one batch (if any)."""
        events = self._events
        if not events:
            return
        batch = engine_pb2.KvEventBatch() if self._subscribers else None
        while events:
            event = events.popleft()
            if isinstance(event, BlocksStored):
                self.hashes.update(event.block_hashes)
                if batch is not None:
                    batch.events.add().stored.CopyFrom(engine_pb2.BlocksStored(
                        block_hashes=event.block_hashes, parent_block_hash=event.parent_hash))
            else:
                assert isinstance(event, BlocksRemoved)
                self.hashes.difference_update(event.block_hashes)
                if batch is not None:
                    batch.events.add().removed.block_hashes.extend(event.block_hashes)
        self.sequence += 1
        if batch is None:
            return
        self._stamp(batch)
        for sub in self._subscribers:
            if sub.lagged:
                continue
            if len(sub.queue) >= MAX_QUEUED_BATCHES:
                sub.lagged = True  # what it missed is replaced by a snapshot when it reads next
                sub.queue.clear()
            else:
                sub.queue.append(batch)
        self._wake()

    def snapshot(self) -> engine_pb2.KvEventBatch:
        batch = engine_pb2.KvEventBatch(snapshot=True)
        batch.events.add().stored.block_hashes.extend(self.hashes)
        return self._stamp(batch)

    def _stamp(self, batch: engine_pb2.KvEventBatch) -> engine_pb2.KvEventBatch:
        batch.engine_id, batch.sequence = self.engine_id, self.sequence
        batch.engine_time, batch.block_size = time.monotonic(), self.block_size
        return batch

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def run(self, wait_step) -> None:
        """Drain after every engine step: `wait_step(timeout)` returns when one was delivered."""
        while True:
            await wait_step(None)
            self.drain()

    async def subscribe(self, heartbeat_s: float):
        """The batches for one subscriber: a snapshot, then every batch, heartbeats in between."""
        sub = _Subscriber()
        self.drain()  # the snapshot includes everything recorded up to now
        self._subscribers.add(sub)
        try:
            yield self.snapshot()
            while True:
                changed = self._changed
                if sub.lagged:
                    sub.lagged = False
                    log.warning("a KV-event subscriber fell behind; sending it a fresh snapshot")
                    yield self.snapshot()
                elif sub.queue:
                    yield sub.queue.popleft()
                else:
                    try:
                        await asyncio.wait_for(changed.wait(), heartbeat_s)
                    except asyncio.TimeoutError:
                        yield self._stamp(engine_pb2.KvEventBatch())
        finally:
            self._subscribers.discard(sub)
