"""Prefix caching over gRPC: SubscribeKvEvents (snapshot, numbered batches, heartbeats, a late
subscriber), cached prompt tokens in the response, cache_salt and the bypass flag, the metrics.
A real in-process EngineServer with stories260k (fp32, CPU) on loopback."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
import pytest_asyncio
from engine_driver import one_torch_thread
from prometheus_client import REGISTRY

from engine_svc.config import EngineConfig
from engine_svc.server import EngineServer
from kvmesh.prefix_hash import prompt_block_hashes
from kvmesh.serving.channels import create_channel
from kvmesh.telemetry.metrics import EngineMetrics
from kvmesh.v1 import common_pb2, engine_pb2, engine_pb2_grpc

pytestmark = pytest.mark.asyncio(loop_scope="module")
NUM_BLOCKS = 64
BS = 16
_threads = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

SYSTEM = [1] + [(11 * i + 7) % 400 + 3 for i in range(47)]  # 48 tokens: 3 full blocks


def _config(model, **kw) -> EngineConfig:
    return EngineConfig(model=str(model), device="cpu", dtype="float32", max_num_batched_tokens=256,
                        num_gpu_blocks_override=NUM_BLOCKS, **kw)


@contextlib.asynccontextmanager
async def serving(config):
    srv = EngineServer(config)
    await srv.start()
    try:
        await srv.startup()
        async with create_channel(f"127.0.0.1:{srv.port}") as ch:
            yield srv, engine_pb2_grpc.EngineStub(ch)
    finally:
        await srv.stop(0)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(stories260k_dir):
    async with serving(_config(stories260k_dir)) as pair:
        yield pair


async def generate(stub, prompt, max_tokens=4, **kw) -> list[engine_pb2.GenerateResponse]:
    req = engine_pb2.GenerateRequest(prompt_token_ids=prompt, sampling=common_pb2.SamplingParams(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=True), **kw)
    return [r async for r in stub.Generate(req)]


class IndexFromEvents:
    """What a router keeps: the engine's hashes, from a snapshot and consecutive batches."""

    def __init__(self, call):
        self.call, self.hashes, self.sequence, self.batches = call, set(), None, []

    async def read(self) -> engine_pb2.KvEventBatch:
        batch = await asyncio.wait_for(self.call.read(), 10)
        self.batches.append(batch)
        if batch.snapshot:
            self.hashes = set()
        elif batch.events:
            assert batch.sequence == self.sequence + 1, "batches are numbered consecutively"
        else:
            assert batch.sequence == self.sequence, "a heartbeat repeats the last sequence"
        self.sequence = batch.sequence
        for event in batch.events:
            if event.HasField("stored"):
                self.hashes.update(event.stored.block_hashes)
            else:
                self.hashes.difference_update(event.removed.block_hashes)
        return batch

    async def until(self, predicate) -> None:
        while not predicate(self.hashes):
            await self.read()


async def test_events_follow_stores_and_a_late_subscriber_gets_a_snapshot(engine):
    srv, stub = engine
    early = IndexFromEvents(stub.SubscribeKvEvents(engine_pb2.SubscribeKvEventsRequest(heartbeat_ms=100)))
    first = await early.read()
    assert first.snapshot and first.block_size == BS and first.engine_id == srv.service.engine_id
    prompt = SYSTEM + [20, 21, 22]
    out = await generate(stub, prompt)
    want = set(prompt_block_hashes(prompt, BS))  # the router's hashes of the same ids
    assert len(want) == 3
    await early.until(lambda held: want <= held)
    late = IndexFromEvents(stub.SubscribeKvEvents(engine_pb2.SubscribeKvEventsRequest(heartbeat_ms=100)))
    snap = await late.read()
    assert snap.snapshot and want <= late.hashes and snap.sequence == srv.service.kv_events.sequence
    assert late.hashes == set(srv.service.kv_events.hashes)
    assert out[-1].num_cached_prompt_tokens == 0
    heartbeat = await late.read()  # nothing happened since: an empty batch within heartbeat_ms
    assert not heartbeat.events and heartbeat.sequence == snap.sequence
    early.call.cancel()
    late.call.cancel()


async def test_second_request_reports_its_cached_prompt_tokens(engine):
    srv, stub = engine
    await generate(stub, SYSTEM + [30])
    out = await generate(stub, SYSTEM + [31, 32])
    assert out[-1].num_cached_prompt_tokens == 48 and out[-1].usage.cached_prompt_tokens == 48
    load = await stub.GetLoad(engine_pb2.GetLoadRequest())
    assert load.cached_blocks >= 3 and load.in_use_blocks == 0
    assert load.free_blocks + load.cached_blocks == load.total_blocks


async def test_salt_and_bypass_do_not_share(engine):
    srv, stub = engine
    await generate(stub, SYSTEM + [40])
    salted = await generate(stub, SYSTEM + [41], cache_salt="tenant-b")
    bypass = await generate(stub, SYSTEM + [42], prefix_cache=False)
    again = await generate(stub, SYSTEM + [43], cache_salt="tenant-b")
    assert [salted[-1].num_cached_prompt_tokens, bypass[-1].num_cached_prompt_tokens,
            again[-1].num_cached_prompt_tokens] == [0, 0, 48]
    assert [t.id for r in salted for t in r.tokens] == [t.id for r in again for t in r.tokens]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await generate(stub, [1, 2], cache_salt="x" * 257)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cache_salt" in err.value.details()


async def test_prefix_cache_metrics_count_tokens(engine):
    srv, stub = engine
    metrics = EngineMetrics("kv-events-test")
    metrics.watch_load(lambda: srv.engine.load)
    before = REGISTRY.get_sample_value("kvmesh:prefix_cache_hits_total", {"model_name": "kv-events-test"})
    await generate(stub, SYSTEM + [50])
    await generate(stub, SYSTEM + [51])
    queries = REGISTRY.get_sample_value("kvmesh:prefix_cache_queries_total", {"model_name": "kv-events-test"})
    hits = REGISTRY.get_sample_value("kvmesh:prefix_cache_hits_total", {"model_name": "kv-events-test"})
    assert hits - before >= 48 and queries >= hits
    caps = (await stub.GetInfo(common_pb2.GetInfoRequest())).capabilities
    assert {"prefix_caching", "kv_events", "cache_salt"} <= set(caps)


async def test_caching_off_refuses_kv_events_and_frees_everything(stories260k_dir):
    async with serving(_config(stories260k_dir, enable_prefix_caching=False)) as (srv, stub):
        await generate(stub, SYSTEM + [1])
        out = await generate(stub, SYSTEM + [2])
        assert out[-1].num_cached_prompt_tokens == 0
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.SubscribeKvEvents(engine_pb2.SubscribeKvEventsRequest()).read()
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        load = await stub.GetLoad(engine_pb2.GetLoadRequest())
        assert (load.free_blocks, load.cached_blocks) == (NUM_BLOCKS, 0)
        assert "kv_events" not in (await stub.GetInfo(common_pb2.GetInfoRequest())).capabilities
