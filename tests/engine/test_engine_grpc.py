"""kvmesh.v1.Engine over gRPC on loopback: a real in-process EngineServer with stories260k (fp32, CPU).

After every failing or cancelled request the free blocks are asserted back at the baseline.
"""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine_driver import one_torch_thread

from engine_svc.config import EngineConfig
from engine_svc.core.hooks import EngineHooks
from engine_svc.model_runner import ModelRunner
from engine_svc.server import WARMUP_REQUEST_ID, EngineServer
from kvmesh.serving.channels import create_channel
from kvmesh.v1 import SCHEMA_REVISION, common_pb2, engine_pb2, engine_pb2_grpc
from tests.blocks_baseline import assert_blocks_baseline, checked_engine_stub

pytestmark = pytest.mark.asyncio(loop_scope="module")
NUM_BLOCKS = 128
LONG = common_pb2.SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)


class RecordingRunner(ModelRunner):
    """The real runner, recording every token id that reached the model."""

    seen: set[int] = set()
    request_ids: list[str] = []

    def launch(self, plan):
        # Host token ids reach the model only through new rows; decodes feed the model's own samples.
        for s in plan.new_seqs:
            RecordingRunner.seen.update(s.prompt_token_ids + s.output_token_ids)
        for rid in plan.req_ids:
            if not RecordingRunner.request_ids or RecordingRunner.request_ids[-1] != rid:
                RecordingRunner.request_ids.append(rid)
        return super().launch(plan)


class StepHooks(EngineHooks):
    """Counts steps and remembers at which step each request finished (engine thread)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.steps = 0
        self.finished_at: dict[str, int] = {}

    def on_step(self, info):
        with self.lock:
            self.steps = info.step

    def on_finished(self, req):
        with self.lock:
            self.finished_at[req.request_id] = self.steps


_threads = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


def config(model, **kw) -> EngineConfig:
    return EngineConfig(model=str(model), device="cpu", dtype="float32", max_num_batched_tokens=256,
                        num_gpu_blocks_override=NUM_BLOCKS, **kw)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(stories260k_dir):
    hooks = StepHooks()
    srv = EngineServer(config(stories260k_dir), hooks=hooks, runner_factory=RecordingRunner)
    srv.hooks = hooks
    await srv.start()
    # Before startup: listening, NOT_SERVING, phase LOADING_WEIGHTS, Generate refused.
    async with create_channel(f"127.0.0.1:{srv.port}") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", "kvmesh.v1.Engine"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        status = await engine_pb2_grpc.EngineStub(ch).GetStatus(engine_pb2.GetStatusRequest())
        assert status.phase == engine_pb2.ENGINE_PHASE_LOADING_WEIGHTS
        info = await engine_pb2_grpc.EngineStub(ch).GetInfo(common_pb2.GetInfoRequest())
        assert info.model == "stories260k" and not info.HasField("kv_total_blocks")  # not sized yet
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(engine_pb2_grpc.EngineStub(ch), [1, 2, 3])
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    srv.pre_startup_checked = True
    await srv.startup()
    yield srv
    await srv.stop(0)


@pytest_asyncio.fixture(loop_scope="module")
async def stub(server):
    async with checked_engine_stub(server, NUM_BLOCKS) as s:
        yield s


async def collect(stub, prompt, sampling=None, **kw) -> list[engine_pb2.GenerateResponse]:
    req = engine_pb2.GenerateRequest(prompt_token_ids=prompt, sampling=sampling or common_pb2.SamplingParams(
        temperature=0.0, max_tokens=8), **kw)
    return [r async for r in stub.Generate(req)]


async def assert_baseline(server, timeout: float = 5.0) -> None:
    """No block in use (all free, or cached: evictable prefix blocks, prefix caching is on), nothing
    running or waiting (waiting at most `timeout` for the engine thread)."""
    await assert_blocks_baseline(server, NUM_BLOCKS, timeout)


def ids(responses) -> list[int]:
    return [t.id for r in responses for t in r.tokens]


async def test_health_serving_after_warmup(server, stub, stories260k_dir):
    assert server.pre_startup_checked
    assert RecordingRunner.request_ids[0] == WARMUP_REQUEST_ID  # the warm-up ran through the loop
    async with create_channel(f"127.0.0.1:{server.port}") as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="kvmesh.v1.Engine"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    status = await stub.GetStatus(engine_pb2.GetStatusRequest())
    assert status.phase == engine_pb2.ENGINE_PHASE_READY
    assert set(status.phase_seconds) == {"LOADING_WEIGHTS", "ALLOCATING_KV", "COMPILING", "WARMING_UP"}


async def test_get_info(stub):
    info = await stub.GetInfo(common_pb2.GetInfoRequest())
    assert (info.name, info.schema_revision, info.model) == ("kvmesh-engine", SCHEMA_REVISION, "stories260k")
    assert (info.max_model_len, info.vocab_size, list(info.eos_token_ids)) == (512, 512, [2, 1])
    assert (info.kv_block_size, info.kv_total_blocks, info.bos_token_id) == (16, NUM_BLOCKS, 1)


async def test_streaming_greedy_example(stub, stories260k_dir):
    from engine_driver import examples
    e = examples(stories260k_dir)[0]
    responses = await collect(stub, e["prompt_ids"], common_pb2.SamplingParams(
        temperature=0.0, max_tokens=128, ignore_eos=True, logprobs=True, top_logprobs=2), request_id="ex0")
    # Usually one response per step, one token each; outputs that queued up while the handler was
    # busy share a response (test_queued_outputs_share_one_response), so count tokens, not responses.
    assert 1 <= len(responses) <= 128 and all(r.tokens for r in responses)
    assert ids(responses) == e["expected_ids"]
    assert [t.index for r in responses for t in r.tokens] == list(range(128))
    assert all(r.request_id == "ex0" for r in responses)
    first = responses[0].tokens[0]
    assert first.HasField("logprob") and first.logprob <= 0 and first.top_logprobs[0].token_id == first.id
    last = responses[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(e["prompt_ids"]), 128)
    assert all(r.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for r in responses[:-1])


async def test_stop_token_reported(stub, stories260k_dir):
    from engine_driver import examples
    e = examples(stories260k_dir)[1]
    stop = e["expected_ids"][10]
    first = e["expected_ids"].index(stop)
    responses = await collect(stub, e["prompt_ids"], common_pb2.SamplingParams(
        temperature=0.0, max_tokens=64, stop_token_ids=[stop]))
    assert ids(responses) == e["expected_ids"][:first + 1]
    assert responses[-1].finish_reason == common_pb2.FINISH_REASON_STOP_TOKEN
    assert responses[-1].matched_stop_token_id == stop


async def test_engine_mints_request_id_and_attaches_load(stub):
    responses = await collect(stub, [1, 50, 60], include_load=True)
    assert len(responses[0].request_id) == 32
    # A report on the first response and on the last (the router's bookkeeping), none between.
    n = len(responses)  # 8 tokens: outputs that queued up may share a response
    expected = [True] + [False] * (n - 2) + [True] if n > 1 else [True]
    assert [r.HasField("load") for r in responses] == expected
    loads = [responses[0].load, responses[-1].load]
    assert all(load.total_blocks == NUM_BLOCKS and load.block_size == 16 for load in loads)
    assert loads[0].num_running_requests == 1 and loads[0].in_use_blocks >= 1
    assert [load.sequence for load in loads] == sorted({load.sequence for load in loads})


async def test_cancel_mid_stream_frees_blocks_within_one_step(server, stub):
    hooks = server.hooks
    aborted_at = {}
    real_abort = server.engine.abort

    def spy(request_id, *a, **kw):
        with hooks.lock:
            aborted_at[request_id] = hooks.steps
        return real_abort(request_id, *a, **kw)

    server.engine.abort = spy
    try:
        call = stub.Generate(engine_pb2.GenerateRequest(request_id="cancel-me", prompt_token_ids=[1, 5, 6],
                                                        sampling=LONG))
        for _ in range(3):
            await call.read()
        assert server.engine.load.in_use_blocks > 0
        call.cancel()
        await assert_baseline(server)
    finally:
        server.engine.abort = real_abort
    assert hooks.finished_at["cancel-me"] <= aborted_at["cancel-me"] + 1


async def test_abort_semantics(server, stub):
    call = stub.Generate(engine_pb2.GenerateRequest(request_id="ab", prompt_token_ids=[1, 7, 8], sampling=LONG))
    await call.read()
    reply = await stub.Abort(engine_pb2.AbortRequest(request_id="ab"))
    assert reply.result == engine_pb2.ABORT_RESULT_ABORTED
    rest = []  # read() to the end: a plain grpc.aio call does not mix read() with `async for`
    while (r := await call.read()) is not grpc.aio.EOF:
        rest.append(r)
    assert rest[-1].finish_reason == common_pb2.FINISH_REASON_CANCELLED
    assert rest[-1].usage.completion_tokens < 400
    assert (await stub.Abort(engine_pb2.AbortRequest(request_id="ab"))).result == \
        engine_pb2.ABORT_RESULT_ALREADY_FINISHED
    assert (await stub.Abort(engine_pb2.AbortRequest(request_id="never"))).result == \
        engine_pb2.ABORT_RESULT_NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Abort(engine_pb2.AbortRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("request_id:")
    await assert_baseline(server)


async def test_live_duplicate_id_already_exists_then_reuse_is_fine(server, stub):
    call = stub.Generate(engine_pb2.GenerateRequest(request_id="dup", prompt_token_ids=[1, 9], sampling=LONG))
    await call.read()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub, [1, 9], request_id="dup")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS and "dup" in err.value.details()
    call.cancel()
    await assert_baseline(server)
    assert len(ids(await collect(stub, [1, 9], request_id="dup"))) == 8  # finished ids may be reused


@pytest.mark.parametrize("prompt,sampling,field,words", [
    ([1] * 6, dict(max_tokens=600), "sampling.max_tokens", ["6", "600", "512", "max_model_len"]),
    ([1] * 512, dict(), "prompt_token_ids", ["512", "max_model_len"]),
    ([], dict(), "prompt_token_ids", ["empty"]),
    ([1, 511, 512, 3], dict(), "prompt_token_ids", ["512", "index 2", "[0, 512)"]),
    ([1, 2], dict(temperature=-1.0), "sampling.temperature", ["-1", "[0, 100]"]),
    ([1, 2], dict(top_p=0.0), "sampling.top_p", ["(0, 1]"]),
    ([1, 2], dict(stop_token_ids=[600]), "sampling.stop_token_ids", ["600"]),
    ([1, 2], dict(top_logprobs=21), "sampling.top_logprobs", ["21"]),
])
async def test_invalid_argument(server, stub, prompt, sampling, field, words):
    seen_before = set(RecordingRunner.seen)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub, prompt, common_pb2.SamplingParams(temperature=0.0, **sampling)
                      if "temperature" not in sampling else common_pb2.SamplingParams(**sampling))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ":")
    for word in words:
        assert word in err.value.details()
    assert RecordingRunner.seen == seen_before  # nothing of a rejected request reaches the model
    assert not any(t >= 512 for t in RecordingRunner.seen)
    await assert_baseline(server)


async def test_load_reports_move_as_requests_start_and_finish(server, stub):
    watch = stub.WatchLoad(engine_pb2.WatchLoadRequest(min_interval_ms=0, heartbeat_ms=200))
    first = await watch.read()
    assert (first.free_blocks + first.cached_blocks, first.in_use_blocks, first.num_running_requests) == \
        (NUM_BLOCKS, 0, 0)
    assert first.free_blocks + first.cached_blocks + first.in_use_blocks == first.total_blocks
    gen = asyncio.ensure_future(collect(stub, [1] + [40] * 40, common_pb2.SamplingParams(
        temperature=0.0, max_tokens=40, ignore_eos=True)))
    busy = idle_again = None
    seqs = [first.sequence]
    while idle_again is None:
        report = await asyncio.wait_for(watch.read(), 10)
        seqs.append(report.sequence)
        assert report.free_blocks + report.cached_blocks + report.in_use_blocks == report.total_blocks
        if report.num_running_requests == 1 and busy is None:
            busy = report
        if busy is not None and report.num_running_requests == 0 and report.in_use_blocks == 0 \
                and report.free_blocks + report.cached_blocks == NUM_BLOCKS:
            idle_again = report
    await gen
    watch.cancel()
    assert busy.in_use_blocks >= 3 and busy.num_running_tokens >= 41
    assert busy.reserved_blocks == -(-81 // 16) - busy.in_use_blocks  # growth to prompt + max_tokens
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert idle_again.engine_time > first.engine_time
    load = await stub.GetLoad(engine_pb2.GetLoadRequest())
    assert load.sequence > idle_again.sequence and not load.draining


async def test_heartbeat_when_idle(stub):
    watch = stub.WatchLoad(engine_pb2.WatchLoadRequest(heartbeat_ms=50))
    reports = [await asyncio.wait_for(watch.read(), 2) for _ in range(3)]
    watch.cancel()
    assert [(r.free_blocks + r.cached_blocks, r.in_use_blocks) for r in reports] == [(NUM_BLOCKS, 0)] * 3
    assert reports[2].engine_time - reports[0].engine_time >= 0.09


async def test_concurrent_streams_match_serial(stub, stories260k_dir):
    from engine_driver import examples
    exs = examples(stories260k_dir)
    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    outs = await asyncio.gather(*[collect(stub, e["prompt_ids"], sampling) for e in exs * 4])
    assert [ids(o) for o in outs] == [e["expected_ids"][:32] for e in exs * 4]


async def test_queued_outputs_share_one_response(server, stub, stories260k_dir):
    """A handler that falls behind the engine sends what queued up as one response: every token
    once, in order, with its index, logprobs and top candidates; the finish and the load report on
    it; the same tokens as the stream that kept up."""
    from engine_driver import examples
    e = examples(stories260k_dir)[0]
    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=True,
                                         top_logprobs=2)
    kept_up = await collect(stub, e["prompt_ids"], sampling)
    request = engine_pb2.GenerateRequest(request_id="behind", prompt_token_ids=e["prompt_ids"], sampling=sampling)
    stream = server.service.stream(server.service.validate(request), include_load=True)
    first = await anext(stream)
    assert await server.engine.wait_idle(10)  # the engine finished it: every output is queued
    rest = [r async for r in stream]
    assert len(rest) == 1
    last = rest[0]
    assert first.HasField("load") and last.HasField("load") and first.load.sequence < last.load.sequence
    assert [t.index for r in [first, last] for t in r.tokens] == list(range(40))
    assert ids([first, last]) == ids(kept_up) == e["expected_ids"][:40]
    tokens = [t for r in kept_up for t in r.tokens]
    assert [(t.logprob, [c.token_id for c in t.top_logprobs]) for t in last.tokens] == \
        [(t.logprob, [c.token_id for c in t.top_logprobs]) for t in tokens[len(first.tokens):]]
    assert all(len(t.top_logprobs) == 2 for t in last.tokens)
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(e["prompt_ids"]), 40)
    await assert_baseline(server)


async def test_freeze_gc_once_ready(stories260k_dir):
    """`kvmesh-engine` freezes the collector's view of the heap once ready (a full collection then
    skips the model and the imports); a server that was not asked to leaves the collector alone."""
    import gc
    assert gc.get_freeze_count() == 0
    srv = EngineServer(config(stories260k_dir))
    srv.freeze_gc = True
    await srv.start()
    try:
        await srv.startup()
        assert gc.get_freeze_count() > 0
    finally:
        await srv.stop()
    # Given back at stop (frozen objects are never freed at exit; and gc.freeze is process-wide).
    assert gc.get_freeze_count() == 0
