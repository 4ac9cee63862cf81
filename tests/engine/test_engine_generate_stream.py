"""kvmesh.v1.Engine/GenerateStream on loopback: many requests on one stream, against a real
in-process EngineServer with stories260k (fp32, CPU).

Greedy outputs on the stream equal the engine's references; requests interleave (one message
carries several requests' tokens); a cancel ends one request and leaves the others running; a
refused request gets its own status while the others go on; a dropped stream aborts every request
on it. After each test the free blocks are back at the baseline.
"""

from __future__ import annotations

import grpc
import pytest
import pytest_asyncio
from google.rpc import error_details_pb2
from opentelemetry import trace

from engine_driver import examples, one_torch_thread

from engine_svc.config import EngineConfig
from engine_svc.core.hooks import EngineHooks
from engine_svc.server import EngineServer
from kvmesh.serving.channels import create_channel
from kvmesh.v1 import common_pb2, engine_pb2, engine_pb2_grpc
from tests.blocks_baseline import assert_blocks_baseline, checked_engine_stub

pytestmark = pytest.mark.asyncio(loop_scope="module")
NUM_BLOCKS = 128
LONG = common_pb2.SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C


class ParentRecordingHooks(EngineHooks):
    """Remembers the span context current when each request's trace began (its parent)."""

    def __init__(self):
        self.parents: dict[str, trace.SpanContext] = {}

    def begin(self, request_id, num_prompt_tokens, sampling=None):
        self.parents[request_id] = trace.get_current_span().get_span_context()
        return None


_threads = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(stories260k_dir):
    cfg = EngineConfig(model=str(stories260k_dir), device="cpu", dtype="float32", max_num_batched_tokens=256,
                       num_gpu_blocks_override=NUM_BLOCKS)
    srv = EngineServer(cfg, hooks=ParentRecordingHooks())
    await srv.start()
    await srv.startup()
    yield srv
    await srv.stop(0)


@pytest_asyncio.fixture(loop_scope="module")
async def stub(server):
    async with checked_engine_stub(server, NUM_BLOCKS) as s:
        yield s


async def assert_baseline(server) -> None:
    await assert_blocks_baseline(server, NUM_BLOCKS)


def request(request_id: str, prompt, sampling=None, **kw) -> engine_pb2.GenerateRequest:
    return engine_pb2.GenerateRequest(request_id=request_id, prompt_token_ids=prompt, sampling=sampling or common_pb2.SamplingParams(
        temperature=0.0, max_tokens=8), **kw)


async def read_until_done(call, request_ids, messages=None, rejected_ids=()) -> dict:
    """Responses per request until each of request_ids finished and each of rejected_ids was
    rejected (the rejections under key 'rejected')."""
    by_request: dict[str, list] = {rid: [] for rid in request_ids}
    open_ids = set(request_ids)
    unrejected = set(rejected_ids)
    rejected = {}
    while open_ids or unrejected:
        message = await call.read()
        assert message is not grpc.aio.EOF, f"stream ended with {open_ids} open"
        if messages is not None:
            messages.append(message)
        for response in message.responses:
            by_request[response.request_id].append(response)
            if response.finish_reason:
                open_ids.discard(response.request_id)
        for rejection in message.rejections:
            rejected[rejection.request_id] = rejection
            unrejected.discard(rejection.request_id)
    by_request["rejected"] = rejected
    return by_request


def ids(responses) -> list[int]:
    return [t.id for r in responses for t in r.tokens]


async def test_interleaved_requests_match_their_references(server, stub, stories260k_dir):
    exs = examples(stories260k_dir)
    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    call = stub.GenerateStream()
    names = [f"mux-{i}" for i in range(len(exs) * 2)]
    await call.write(engine_pb2.GenerateStreamRequest(requests=[
        request(name, e["prompt_ids"], sampling, include_load=True) for name, e in zip(names, exs * 2)]))
    messages = []
    out = await read_until_done(call, names, messages)
    for name, e in zip(names, exs * 2):
        responses = out[name]
        assert ids(responses) == e["expected_ids"][:32]
        assert [t.index for r in responses for t in r.tokens] == list(range(32))
        assert responses[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert (responses[-1].usage.prompt_tokens, responses[-1].usage.completion_tokens) == (len(e["prompt_ids"]), 32)
        # A load report on the first and the last response only, as Generate attaches them.
        assert [r.HasField("load") for r in responses] == [True] + [False] * (len(responses) - 2) + [True]
    # Requests share messages: far fewer messages than responses.
    assert max(len(m.responses) for m in messages) > 1
    assert len(messages) < sum(len(out[n]) for n in names)
    # One report per message, shared by the responses that carry one.
    for m in messages:
        assert len({r.load.sequence for r in m.responses if r.HasField("load")}) <= 1
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF  # half-closed and nothing live: the engine ends the stream
    assert await call.code() == grpc.StatusCode.OK


async def test_cancel_one_leaves_the_others_running(server, stub, stories260k_dir):
    e = examples(stories260k_dir)[0]
    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    call = stub.GenerateStream()
    await call.write(engine_pb2.GenerateStreamRequest(requests=[
        request("long", [1, 5, 6], LONG), request("keeps", e["prompt_ids"], sampling)]))
    got = {"long": [], "keeps": []}
    while len(got["long"]) < 3:
        for response in (await call.read()).responses:
            got[response.request_id].append(response)
    assert server.engine.is_live("long")
    await call.write(engine_pb2.GenerateStreamRequest(cancel_request_ids=["long", "never-started"]))
    rest = await read_until_done(call, [rid for rid in got if not any(r.finish_reason for r in got[rid])])
    for rid in got:
        got[rid] += rest.get(rid, [])
    last = got["long"][-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_CANCELLED
    assert last.usage.completion_tokens == len(ids(got["long"])) < 400
    assert ids(got["keeps"]) == e["expected_ids"][:48]
    assert got["keeps"][-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    call.cancel()


async def test_dropped_stream_aborts_every_request(server, stub):
    call = stub.GenerateStream()
    await call.write(engine_pb2.GenerateStreamRequest(requests=[
        request(f"drop-{i}", [1, 9 + i, 20], LONG) for i in range(3)]))
    seen = set()
    while len(seen) < 3:
        seen.update(r.request_id for r in (await call.read()).responses)
    assert server.engine.load.in_use_blocks > 0 and server.engine.num_live == 3
    call.cancel()
    await assert_baseline(server)


async def test_a_refused_request_gets_its_own_status(server, stub, stories260k_dir):
    e = examples(stories260k_dir)[1]
    call = stub.GenerateStream()
    await call.write(engine_pb2.GenerateStreamRequest(requests=[
        request("good", e["prompt_ids"]),
        request("empty", []),
        request("vocab", [1, 999, 2]),
        request("too-long", [1, 2], common_pb2.SamplingParams(max_tokens=600)),
        request("good", [1, 2, 3]),  # a live duplicate
        request("", [1, 2, 3]),
    ]))
    out = await read_until_done(call, ["good"], rejected_ids=["empty", "vocab", "too-long", "good", ""])
    assert ids(out["good"]) == e["expected_ids"][:8]
    rejected = out["rejected"]
    assert set(rejected) == {"empty", "vocab", "too-long", "good", ""}
    code = {rid: grpc.StatusCode.INVALID_ARGUMENT.value[0] for rid in ("empty", "vocab", "too-long", "")}
    code["good"] = grpc.StatusCode.ALREADY_EXISTS.value[0]
    assert {rid: r.code for rid, r in rejected.items()} == code
    assert rejected["vocab"].message.startswith("prompt_token_ids: id 999 at index 1 is outside the vocabulary")
    assert "600" in rejected["too-long"].message and "max_model_len 512" in rejected["too-long"].message
    assert rejected[""].message.startswith("request_id: must be set")
    assert "already live" in rejected["good"].message
    violation = error_details_pb2.BadRequest()
    assert rejected["empty"].details[0].Unpack(violation)
    assert violation.field_violations[0].field == "prompt_token_ids"
    call.cancel()


async def test_trace_context_travels_per_request(server, stub):
    parent = f"00-{TRACE_ID:032x}-00f067aa0ba902b7-01"
    call = stub.GenerateStream()
    await call.write(engine_pb2.GenerateStreamRequest(requests=[
        request("traced", [1, 2, 3], trace_context={"traceparent": parent}), request("plain", [1, 2, 4])]))
    await read_until_done(call, ["traced", "plain"])
    parents = server.service._hooks.parents
    assert (parents["traced"].trace_id, parents["traced"].span_id) == (TRACE_ID, 0x00F067AA0BA902B7)
    assert not parents["plain"].is_valid
    call.cancel()


async def test_draining_refuses_new_requests_and_ends_the_stream(stories260k_dir):
    cfg = EngineConfig(model=str(stories260k_dir), device="cpu", dtype="float32", num_gpu_blocks_override=64)
    srv = EngineServer(cfg)
    await srv.start()
    await srv.startup()
    try:
        async with create_channel(f"127.0.0.1:{srv.port}") as ch:
            call = engine_pb2_grpc.EngineStub(ch).GenerateStream()
            sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
            await call.write(engine_pb2.GenerateStreamRequest(requests=[request("in-flight", [1, 2, 3], sampling)]))
            first = await call.read()
            assert first.responses[0].request_id == "in-flight"
            srv.service.start_draining()
            await call.write(engine_pb2.GenerateStreamRequest(requests=[request("late", [1, 2, 3])]))
            out = await read_until_done(call, ["in-flight"], rejected_ids=["late"])
            assert out["rejected"]["late"].code == grpc.StatusCode.UNAVAILABLE.value[0]
            assert "draining" in out["rejected"]["late"].message
            assert len(ids(first.responses) + ids(out["in-flight"])) == 40
            assert await call.read() is grpc.aio.EOF  # draining and nothing live: the stream ends
            assert await call.code() == grpc.StatusCode.OK
    finally:
        await srv.stop(0)
