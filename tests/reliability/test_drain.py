"""Drain ends promptly: a server whose only open streams are watchers (grpc.health Watch, the
engine's WatchLoad and SubscribeKvEvents, a router watching the engine) exits on SIGTERM as soon as its in-flight work
is done, not after the whole grace period; and a router whose grace runs out ends each open stream
with a typed DRAINING error rather than gRPC's generic cancellation."""

from __future__ import annotations

import asyncio
import time

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmesh.serving.channels import create_channel
from kvmesh.v1 import common_pb2, engine_pb2, engine_pb2_grpc, router_pb2, router_pb2_grpc
from tests.reliability.cluster import sigterm_and_time
from tests.stream_reads import read_rest

pytestmark = pytest.mark.slow
GRACE_S = 30.0  # long, so that "waited out the grace" and "exited after its work" stay far apart on a loaded host
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _watch_health(channel) -> list[int]:
    """Every status a health Watch stream gets until it ends (it must end, with OK)."""
    return [r.status async for r in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())]


async def _watch_load(channel) -> list[bool]:
    stub = engine_pb2_grpc.EngineStub(channel)
    return [r.draining async for r in stub.WatchLoad(engine_pb2.WatchLoadRequest(min_interval_ms=0))]


async def _kv_events(channel) -> int:
    stub = engine_pb2_grpc.EngineStub(channel)
    return len([b async for b in stub.SubscribeKvEvents(engine_pb2.SubscribeKvEventsRequest(heartbeat_ms=200))])


async def test_engine_with_watchers_exits_once_its_work_is_done(cluster):
    tok, engine = cluster.tokenizer(), cluster.engine(64, "--grace", str(GRACE_S))
    cluster.wait_healthy(tok, engine)
    router = cluster.router(tok, [engine])  # holds a health Watch and a WatchLoad on the engine
    cluster.wait_healthy(router)
    async with create_channel(engine.address) as channel:
        health = asyncio.create_task(_watch_health(channel))
        load = asyncio.create_task(_watch_load(channel))
        kv_events = asyncio.create_task(_kv_events(channel))
        work = engine_pb2_grpc.EngineStub(channel).Generate(engine_pb2.GenerateRequest(
            prompt_token_ids=[1, 30, 40], sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=60,
                                                                             ignore_eos=True)))
        await work.read()
        await asyncio.sleep(0.3)  # the watchers are connected
        t0 = time.monotonic()
        exited = asyncio.create_task(asyncio.to_thread(sigterm_and_time, engine))
        statuses, drainings, _ = await asyncio.wait_for(asyncio.gather(health, load, kv_events), GRACE_S / 2)
        watchers_ended = time.monotonic() - t0
        rest = await read_rest(work)
        code, took = await exited
    assert watchers_ended < GRACE_S / 3, f"the watch streams ended {watchers_ended:.1f}s after SIGTERM"
    assert code == 0
    assert took < GRACE_S / 2, f"the engine took {took:.1f}s to exit (grace {GRACE_S}s): watchers held the drain open"
    assert rest[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH  # in-flight work still finished
    assert statuses[-1] == NOT_SERVING and drainings[-1] is True


async def test_router_drain_expiry_ends_streams_with_a_draining_error(cluster):
    tok, engine = cluster.tokenizer(), cluster.engine(64)
    cluster.wait_healthy(tok, engine)
    router = cluster.router(tok, [engine], "--grace", "0.3")
    cluster.wait_healthy(router)
    async with create_channel(router.address) as channel, create_channel(engine.address) as ech:
        health = asyncio.create_task(_watch_health(channel))
        call = router_pb2_grpc.RouterStub(channel).Generate(router_pb2.RouterGenerateRequest(
            token_ids=common_pb2.TokenIds(ids=[1, 30, 40]),
            sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True)))
        await call.read()
        code, took = await asyncio.to_thread(sigterm_and_time, router)
        rest = await read_rest(call)
        statuses = await asyncio.wait_for(health, 5)
        for _ in range(50):  # the cancelled engine call frees the request's blocks
            load = await engine_pb2_grpc.EngineStub(ech).GetLoad(engine_pb2.GetLoadRequest())
            if load.num_running_requests == 0:
                break
            await asyncio.sleep(0.1)
    assert code == 0 and took < 4.0, (code, took)
    last = rest[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_ERROR
    assert last.error.reason == common_pb2.ERROR_REASON_DRAINING and last.error.code == 14, last.error
    assert "shutting down" in last.error.message
    assert statuses[-1] == NOT_SERVING
    assert load.num_running_requests == 0 and load.free_blocks + load.cached_blocks == load.total_blocks
