"""Engine shutdown: DRAINING, NOT_SERVING, UNAVAILABLE for new work, in-flight requests finish within
the grace or end with a DRAINING error; and the real process (`python -m engine_svc.server`) started
by kvmesh/procs.py the way `kvmesh up` starts it, exiting 0 on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine_driver import one_torch_thread

from engine_svc.config import EngineConfig
from engine_svc.server import EngineServer
from kvmesh.procs import ServiceProcess
from kvmesh.serving.channels import create_channel
from kvmesh.v1 import common_pb2, engine_pb2, engine_pb2_grpc
from tests.stream_reads import read_rest

NUM_BLOCKS = 40  # 640 tokens: more than one 512-token sequence, less than two


_threads = pytest.fixture(autouse=True)(one_torch_thread)


@contextlib.asynccontextmanager
async def serving(model, num_blocks: int = NUM_BLOCKS):
    """A READY in-process server and a stub on it; stopped however the test ends."""
    srv = EngineServer(EngineConfig(model=str(model), device="cpu", dtype="float32", max_num_batched_tokens=256,
                                    num_gpu_blocks_override=num_blocks))
    await srv.start()
    try:
        await srv.startup()
        async with create_channel(f"127.0.0.1:{srv.port}") as ch:
            yield srv, ch, engine_pb2_grpc.EngineStub(ch)
    finally:
        await srv.stop(0)


def gen(stub, rid: str, max_tokens: int):
    return stub.Generate(engine_pb2.GenerateRequest(request_id=rid, prompt_token_ids=[1, 30, 40], sampling=(
        common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))))


async def test_drain_ends_long_requests_with_draining_error(stories260k_dir):
    async with serving(stories260k_dir) as (srv, ch, stub):
        watch = stub.WatchLoad(engine_pb2.WatchLoadRequest(min_interval_ms=0))
        assert not (await watch.read()).draining
        long = gen(stub, "long", 500)
        await long.read()
        drain = asyncio.create_task(srv.drain(grace_s=0.3))
        await asyncio.sleep(0.05)
        status = await stub.GetStatus(engine_pb2.GetStatusRequest())
        assert status.phase == engine_pb2.ENGINE_PHASE_DRAINING
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await gen(stub, "late", 4).read()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in err.value.details()
        while not (await watch.read()).draining:
            pass
        rest = await read_rest(long)
        await drain
        last = rest[-1]
        assert last.finish_reason == common_pb2.FINISH_REASON_ERROR
        assert last.error.reason == common_pb2.ERROR_REASON_DRAINING and last.error.code == 14
        load = srv.engine.load  # nothing in use; cached prefix blocks stay (evictable)
        assert load.in_use_blocks == 0 and load.free_blocks + load.cached_blocks == NUM_BLOCKS
        assert srv.engine.num_live == 0
        watch.cancel()


async def test_drain_lets_short_requests_finish(stories260k_dir):
    async with serving(stories260k_dir) as (srv, ch, stub):
        short = gen(stub, "short", 30)
        await short.read()
        await srv.drain(grace_s=10.0)
        rest = await read_rest(short)
        assert rest[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert rest[-1].usage.completion_tokens == 30


async def test_two_max_length_sequences_share_a_cache_that_holds_one(stories260k_dir):
    async with serving(stories260k_dir) as (srv, ch, stub):
        # 3 + 509 = 512 tokens = 32 blocks each; 40 blocks hold one: they preempt, and both finish.
        outs = await asyncio.gather(*[_tokens(gen(stub, f"big{i}", 509)) for i in range(2)])
        assert outs[0] == outs[1] and len(outs[0]) == 509
        load = srv.engine.load
        assert load.in_use_blocks == 0 and load.free_blocks + load.cached_blocks == NUM_BLOCKS


async def test_sequence_larger_than_the_whole_cache_is_rejected(stories260k_dir):
    async with serving(stories260k_dir, num_blocks=8) as (srv, ch, stub):  # 128 tokens
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await gen(stub, "huge", 200).read()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert all(w in err.value.details() for w in ("(3 tokens)", "(200)", "13 KV blocks", "holds 8"))
        assert len(await _tokens(gen(stub, "fits", 100))) == 100


async def _tokens(call) -> list[int]:
    return [t.id async for r in call for t in r.tokens]


def test_process_started_by_procs_serves_and_exits_cleanly_on_sigterm(stories260k_dir, tmp_path):
    proc = ServiceProcess("engine", "engine-test", ["--model", str(stories260k_dir), "--num-gpu-blocks-override",
                                                    "64", "--max-num-batched-tokens", "256"],
                          env={"OMP_NUM_THREADS": "1"}, log_path=str(tmp_path / "engine.log")).start()
    try:
        proc.wait_healthy(120, service="kvmesh.v1.Engine")
        with grpc.insecure_channel(proc.address) as ch:
            stub = engine_pb2_grpc.EngineStub(ch)
            status = stub.GetStatus(engine_pb2.GetStatusRequest())
            assert status.phase == engine_pb2.ENGINE_PHASE_READY
            responses = list(stub.Generate(engine_pb2.GenerateRequest(prompt_token_ids=[1, 30, 40], sampling=(
                common_pb2.SamplingParams(temperature=0.0, max_tokens=5)))))
            assert sum(len(r.tokens) for r in responses) == 5
            assert stub.GetInfo(common_pb2.GetInfoRequest()).kv_total_blocks == 64
        assert proc.stop(30) == 0
    finally:
        proc.kill()

