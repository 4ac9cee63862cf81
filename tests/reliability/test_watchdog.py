"""The engine watchdog (engine_svc/watchdog.py), with a runner that hangs or fails on command:
a stalled step flips health to NOT_SERVING with the reason in GetStatus (and back once it ends);
a fatal device error or a dead engine thread ends every in-flight request with ENGINE_LOST and
the server's exit status is EXIT_FATAL; a router watching the engine drops it at once."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.engine.engine_driver import one_torch_thread
from tests.reliability.faulty_runner import EngineThreadKilled, FaultyRunner

from engine_svc.config import EngineConfig
from engine_svc.server import EngineServer
from engine_svc.watchdog import EXIT_FATAL, is_fatal_device_error
from kvmesh.serving.channels import create_channel
from kvmesh.v1 import common_pb2, engine_pb2, engine_pb2_grpc, router_pb2, router_pb2_grpc
from tests.router.client import engine_load, generate, greedy, wait_replicas
from tests.stream_reads import read_rest

NUM_BLOCKS = 40
SERVING = health_pb2.HealthCheckResponse.SERVING
_threads = pytest.fixture(autouse=True)(one_torch_thread)


@contextlib.asynccontextmanager
async def faulty_engine(model, step_timeout_s: float = 0.5):
    """A READY in-process engine on a FaultyRunner, run as `kvmesh-engine` runs (run_until_stopped)."""
    FaultyRunner.instances.clear()
    srv = EngineServer(EngineConfig(model=str(model), device="cpu", dtype="float32", max_num_batched_tokens=256,
                                    num_gpu_blocks_override=NUM_BLOCKS),
                       runner_factory=FaultyRunner, step_timeout_s=step_timeout_s)
    await srv.start()
    run = asyncio.create_task(srv.run_until_stopped(1.0, install_signals=False))
    while not srv.service.ready:
        assert not run.done(), run
        await asyncio.sleep(0.05)
    try:
        async with create_channel(f"127.0.0.1:{srv.port}") as ch:
            yield srv, run, FaultyRunner.instances[0], ch
    finally:
        FaultyRunner.instances[0].release()
        srv.stop_requested.set()
        await asyncio.wait_for(run, 30)


def _generate(ch, max_tokens: int = 200):
    return engine_pb2_grpc.EngineStub(ch).Generate(engine_pb2.GenerateRequest(
        prompt_token_ids=[1, 30, 40], sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                                         ignore_eos=True)))


async def _health(ch) -> int:
    return (await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())).status


async def _until(predicate, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (value := await predicate()):
            return value
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached")


async def test_a_stalled_step_turns_health_not_serving_with_the_reason_and_back(stories260k_dir):
    async with faulty_engine(stories260k_dir) as (srv, run, runner, ch):
        stub = engine_pb2_grpc.EngineStub(ch)
        call = _generate(ch, 50)
        await call.read()
        runner.hang()
        await _until(lambda: _is(_health(ch), health_pb2.HealthCheckResponse.NOT_SERVING))
        status = await stub.GetStatus(engine_pb2.GetStatusRequest())
        assert status.phase == engine_pb2.ENGINE_PHASE_STALLED
        assert "no progress" in status.detail and "bound 0.5s" in status.detail, status.detail
        runner.release()
        await _until(lambda: _is(_health(ch), SERVING))
        assert (await stub.GetStatus(engine_pb2.GetStatusRequest())).phase == engine_pb2.ENGINE_PHASE_READY
        rest = await read_rest(call)
        assert rest[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert not run.done()


async def _is(coro, value) -> bool:
    return (await coro) == value


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread that died
@pytest.mark.parametrize("failure", [RuntimeError("CUDA error: an illegal memory access was encountered"),
                                     EngineThreadKilled("the engine thread stopped")],
                         ids=["cuda_error", "dead_thread"])
async def test_a_fatal_failure_ends_every_request_typed_and_exits_nonzero(stories260k_dir, failure):
    async with faulty_engine(stories260k_dir) as (srv, run, runner, ch):
        calls = [_generate(ch) for _ in range(3)]
        for call in calls:
            await call.read()
        runner.fail_next(failure)
        lasts = [(await read_rest(call))[-1] for call in calls]
        for last in lasts:
            assert last.finish_reason == common_pb2.FINISH_REASON_ERROR
            assert last.error.reason == common_pb2.ERROR_REASON_ENGINE_LOST and last.error.code == 14, last.error
        assert await asyncio.wait_for(asyncio.shield(run), 20) == EXIT_FATAL
        assert srv.status.phase == engine_pb2.ENGINE_PHASE_FAILED
        assert ("CUDA error" if isinstance(failure, RuntimeError) else "engine thread") in srv.status.to_proto().detail


@pytest.mark.slow
async def test_a_router_stops_choosing_a_stalled_engine_at_once(stories260k_dir, cluster):
    tok, healthy = cluster.tokenizer(), cluster.engine(64)
    async with faulty_engine(stories260k_dir) as (srv, run, runner, ch):
        cluster.wait_healthy(tok, healthy)
        router = cluster.router(tok, [healthy, _Address(f"127.0.0.1:{srv.port}")])
        cluster.wait_healthy(router)
        async with create_channel(router.address) as rch:
            rstub = router_pb2_grpc.RouterStub(rch)
            await wait_replicas(rstub, 2)
            healthy_id = (await engine_load(healthy.address)).engine_id
            runner.hang()
            call = _generate(ch, 20)  # a step that runs into the hang
            await _until(lambda: _is(_health(ch), health_pb2.HealthCheckResponse.NOT_SERVING))
            t0 = time.monotonic()
            await wait_replicas(rstub, 1, timeout_s=5)
            dropped_after = time.monotonic() - t0
            results = [await generate(rstub, router_pb2.RouterGenerateRequest(
                token_ids=common_pb2.TokenIds(ids=[1, 30, 40 + i]), sampling=greedy(4))) for i in range(4)]
            runner.release()
            call.cancel()
    assert dropped_after < 1.0, f"the router kept the stalled engine {dropped_after:.2f}s"
    assert [r.status for r in results] == [grpc.StatusCode.OK] * 4
    assert {r.engine_id for r in results} == {healthy_id}


class _Address:
    """An engine the router should reach that is not one of the cluster's processes."""

    def __init__(self, address: str):
        self.address = address


def test_fatal_device_errors_are_told_from_ordinary_ones():
    assert is_fatal_device_error(RuntimeError("CUDA error: device-side assert triggered"))
    assert is_fatal_device_error(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_fatal_device_error(type("OutOfMemoryError", (RuntimeError,), {})("oom"))
    assert not is_fatal_device_error(ValueError("bad shape"))
    assert not is_fatal_device_error(RuntimeError("shape mismatch"))
