"""KvEventPublisher on its own: numbering, the snapshot a subscriber starts from, and the fresh
snapshot a subscriber that fell behind gets instead of the batches it missed."""

from __future__ import annotations

import asyncio
from collections import deque

import pytest

import engine_svc.kv_events as kv_events
from engine_svc.core.prefix_cache import BlocksRemoved, BlocksStored
from engine_svc.kv_events import KvEventPublisher


def _stored(*hashes):
    return BlocksStored(tuple(hashes), 0, 0.0)


def _hashes(batch) -> tuple[set, set]:
    stored = {h for e in batch.events if e.HasField("stored") for h in e.stored.block_hashes}
    removed = {h for e in batch.events if e.HasField("removed") for h in e.removed.block_hashes}
    return stored, removed


def test_batches_are_numbered_and_a_subscriber_starts_from_a_snapshot():
    async def main():
        events = deque([_stored(1, 2)])
        pub = KvEventPublisher(events, "e", 16)
        pub.drain()  # no subscriber yet: applied to the snapshot set only
        assert (pub.sequence, pub.hashes) == (1, {1, 2})
        sub = pub.subscribe(heartbeat_s=0.05)
        snap = await sub.__anext__()
        assert snap.snapshot and snap.sequence == 1 and _hashes(snap) == ({1, 2}, set())
        events.extend([_stored(3), BlocksRemoved((1,), 0.0)])
        pub.drain()
        batch = await sub.__anext__()
        assert (batch.sequence, batch.snapshot) == (2, False) and _hashes(batch) == ({3}, {1})
        beat = await sub.__anext__()
        assert not beat.events and beat.sequence == 2
        assert pub.num_subscribers == 1
        await sub.aclose()
        assert pub.num_subscribers == 0

    asyncio.run(main())


def test_a_subscriber_that_falls_behind_gets_a_fresh_snapshot(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(kv_events, "MAX_QUEUED_BATCHES", 2)

    async def main():
        events: deque = deque()
        pub = KvEventPublisher(events, "e", 16)
        sub = pub.subscribe(heartbeat_s=1.0)
        assert (await sub.__anext__()).snapshot
        for h in range(10, 15):  # five batches, nobody reading
            events.append(_stored(h))
            pub.drain()
        snap = await sub.__anext__()
        assert snap.snapshot and snap.sequence == 5 and _hashes(snap)[0] == {10, 11, 12, 13, 14}
        events.append(_stored(99))
        pub.drain()
        nxt = await sub.__anext__()
        assert nxt.sequence == 6 and _hashes(nxt)[0] == {99}
        await sub.aclose()

    asyncio.run(main())
