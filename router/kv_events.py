"""Feeds the router's PrefixIndex from each engine's SubscribeKvEvents stream.

One follower task per engine address, started and stopped with the engine table's membership
(`KvEventFollowers.sync`, called whenever the pool changes). A follower waits until the engine's
GetInfo is known; an engine without the "kv_events" capability is left to the approximate index
(and one without "prefix_caching" matches nothing). A stream that ends, breaks its sequence
numbering or errs is dropped and re-opened with backoff; the new stream starts with a snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from kvmesh.v1 import engine_pb2, engine_pb2_grpc
from router.prefix_index import PrefixIndex, ReplicaIndex

log = logging.getLogger(__name__)

INFO_POLL_S = 0.2  # while the engine's GetInfo is not known yet


class _SequenceGap(Exception):
    pass


def apply_batch(index: ReplicaIndex, batch: engine_pb2.KvEventBatch, now: float) -> None:
    """Apply one batch to a replica's index. Raises _SequenceGap when batches were missed."""
    if batch.snapshot:
        hashes = [h for e in batch.events if e.HasField("stored") for h in e.stored.block_hashes]
        index.apply_snapshot(batch.engine_id, batch.sequence, hashes, now)
        return
    if batch.engine_id != index.engine_id:
        raise _SequenceGap(f"engine id changed ({index.engine_id} -> {batch.engine_id}) without a snapshot")
    if not batch.events or batch.sequence <= index.sequence:
        index.heartbeat(now)  # a heartbeat, or a batch the snapshot already included
        return
    if batch.sequence != index.sequence + 1:
        raise _SequenceGap(f"batch {batch.sequence} after {index.sequence}")
    index.apply_batch(batch.sequence, [e.stored.block_hashes for e in batch.events if e.HasField("stored")],
                      [e.removed.block_hashes for e in batch.events if e.HasField("removed")], now)


class KvEventFollowers:
    """The follower tasks of one router, by engine address.

    Args:
        index: the PrefixIndex the followers feed.
        heartbeat_ms: heartbeat asked of each engine (below index.staleness_s).
    """

    def __init__(self, index: PrefixIndex, heartbeat_ms: int = 500):
        self.index = index
        self.heartbeat_ms = heartbeat_ms
        self._tasks: dict[str, asyncio.Task] = {}

    def sync(self, engines: dict) -> None:
        """Follow every engine of the table (address -> router.engine_client.EngineClient), and only those."""
        for address, engine in engines.items():
            if address not in self._tasks and not engine.removed:
                self._tasks[address] = asyncio.create_task(self._follow(engine), name=f"kv-events-{address}")
        for address in [a for a in self._tasks if a not in engines or engines[a].removed]:
            self._tasks.pop(address).cancel()
            self.index.forget(address)

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _follow(self, engine) -> None:
        index = self.index.replica(engine.address)
        delay = 0.2
        while True:
            info = engine.info
            if info is None:
                await asyncio.sleep(INFO_POLL_S)
                continue
            index.capacity = max(1, info.kv_total_blocks or index.capacity)
            index.prefix_caching = "prefix_caching" in info.capabilities
            if "kv_events" not in info.capabilities:
                await asyncio.sleep(5.0)  # an engine without events: the routed index stands in
                continue
            try:
                await self._read(engine, index)
                reason = "stream ended"
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                reason = f"{exc.code().name}: {exc.details()}"
            except _SequenceGap as exc:
                reason = str(exc)
            index.events_lost()
            log.info("kv events from %s lost (%s); retrying", engine.address, reason)
            await asyncio.sleep(delay)
            delay = min(5.0, delay * 2)

    async def _read(self, engine, index: ReplicaIndex) -> None:
        # Its own stub on the engine's channel: the stream is this follower's, not the request path's.
        stub = engine_pb2_grpc.EngineStub(engine.channel)
        call = stub.SubscribeKvEvents(engine_pb2.SubscribeKvEventsRequest(heartbeat_ms=self.heartbeat_ms))
        try:
            async for batch in call:
                apply_batch(index, batch, time.monotonic())
        finally:
            call.cancel()
