"""The router's EngineClient on the shared GenerateStream, against a real in-process EngineServer
(stories260k, fp32, CPU) on loopback.

Requests interleave on one stream and each gets exactly what its own Generate call gets; a cancel
of one leaves the others running; an abort (a stop string's) still delivers the request's last
response; a refused request fails alone with the engine's status and details; a deadline cancels
the request on the engine; a stream that fails fails every request on it with UNAVAILABLE, the
engine frees their blocks, and the next request opens a new stream. After each test the engine's
blocks are back at the baseline.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
import pytest_asyncio
import torch
from google.rpc import error_details_pb2

from engine_svc.config import EngineConfig
from engine_svc.server import EngineServer
from kvmesh.serving.channels import create_channel
from kvmesh.serving.errors import status_details
from kvmesh.v1 import common_pb2, engine_pb2
from router.engine_client import EngineClient
from router.engine_stream import StreamedCall
from tests.blocks_baseline import assert_blocks_baseline

pytestmark = pytest.mark.asyncio(loop_scope="module")
NUM_BLOCKS = 96
LONG = common_pb2.SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
PROMPTS = [[1, 20 + i, 40 + 3 * i, 7] for i in range(8)]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(stories260k_dir):
    cfg = EngineConfig(model=str(stories260k_dir), device="cpu", dtype="float32", num_gpu_blocks_override=NUM_BLOCKS)
    srv = EngineServer(cfg)
    await srv.start()
    await srv.startup()
    yield srv
    await srv.stop(0)


@pytest_asyncio.fixture(loop_scope="module")
async def client(server):
    engine = EngineClient(f"127.0.0.1:{server.port}", create_channel(f"127.0.0.1:{server.port}"), "shared")
    await engine.fetch_info(timeout=5.0)
    assert engine.multiplexed
    yield engine
    await engine.close()
    await assert_baseline(server)


async def assert_baseline(server) -> None:
    await assert_blocks_baseline(server, NUM_BLOCKS)


def request(request_id: str, prompt, sampling=None) -> engine_pb2.GenerateRequest:
    return engine_pb2.GenerateRequest(request_id=request_id, prompt_token_ids=prompt, include_load=True,
                                      sampling=sampling or common_pb2.SamplingParams(temperature=0.0, max_tokens=24,
                                                                                     ignore_eos=True))


async def tokens(call) -> tuple[list[int], engine_pb2.GenerateResponse]:
    responses = [r async for r in call]
    return [t.id for r in responses for t in r.tokens], responses[-1]


async def test_interleaved_requests_get_what_their_own_generate_calls_get(client):
    per_request = EngineClient(client.address, client.channel, "per_request")
    await per_request.fetch_info(timeout=5.0)
    assert not per_request.multiplexed
    expected = await asyncio.gather(*[tokens(per_request.generate(request(f"ref-{i}", p), None))
                                      for i, p in enumerate(PROMPTS)])
    calls = [client.generate(request(f"mux-{i}", p), None) for i, p in enumerate(PROMPTS)]
    assert all(isinstance(c, StreamedCall) for c in calls)
    stream = client.stream.get()
    assert stream.num_messages == 0  # nothing written yet: the writer runs after this turn
    got = await asyncio.gather(*[tokens(c) for c in calls])
    assert [ids for ids, _ in got] == [ids for ids, _ in expected]
    assert all(last.finish_reason == common_pb2.FINISH_REASON_LENGTH and last.usage.completion_tokens == 24
               and last.HasField("load") for _, last in got)
    assert stream.num_messages == 1  # the eight requests went out in one message
    assert client.stream.get() is stream and stream.num_live == 0


async def test_cancel_one_the_others_run_on(server, client):
    long = client.generate(request("long", [1, 5, 6], LONG), None)
    short = [client.generate(request(f"short-{i}", p), None) for i, p in enumerate(PROMPTS[:3])]
    for _ in range(3):
        await long.read()
    assert server.engine.is_live("long")
    long.cancel()
    with pytest.raises(asyncio.CancelledError):
        await long.read()
    results = await asyncio.gather(*[tokens(c) for c in short])
    assert all(len(ids) == 24 for ids, _ in results)
    await assert_baseline(server)


async def test_abort_still_delivers_the_last_response(server, client):
    call = client.generate(request("stop-string", [1, 8, 9], LONG), None)
    first = await call.read()
    client.abort("stop-string", call)  # a stop string matched: stop the engine, read its usage
    rest = [r async for r in call]
    assert rest[-1].finish_reason == common_pb2.FINISH_REASON_CANCELLED
    assert rest[-1].usage.completion_tokens == sum(len(r.tokens) for r in [first, *rest]) < 400
    await assert_baseline(server)


async def test_a_refused_request_fails_alone_with_its_status(client):
    good = client.generate(request("fine", PROMPTS[0]), None)
    bad = client.generate(request("bad", [1, 5000, 2]), None)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await bad.read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("prompt_token_ids: id 5000 at index 1 is outside the vocabulary")
    violation = error_details_pb2.BadRequest()
    assert status_details(err.value)[0].Unpack(violation)
    assert violation.field_violations[0].field == "prompt_token_ids"
    ids, last = await tokens(good)
    assert len(ids) == 24 and last.finish_reason == common_pb2.FINISH_REASON_LENGTH


async def test_deadline_cancels_the_request_on_the_engine(server, client):
    call = client.generate(request("slow", [1, 10, 11], LONG), timeout=0.3)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in call:
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await assert_baseline(server)


async def test_a_failed_stream_fails_its_requests_and_the_next_opens_a_new_one(server, client, monkeypatch):
    calls = [client.generate(request(f"doomed-{i}", p, LONG), None) for i, p in enumerate(PROMPTS[:3])]
    for call in calls:
        await call.read()
    old = client.stream.get()

    def broken(response, outputs):
        raise RuntimeError("a bug in the engine's response building")

    monkeypatch.setattr(server.service, "fill_response", broken)  # the engine's stream ends with INTERNAL
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in call:
                pass
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "GenerateStream failed: INTERNAL" in err.value.details()
    monkeypatch.undo()
    await assert_baseline(server)  # the engine aborted every request of the broken stream
    ids, last = await tokens(client.generate(request("after", PROMPTS[1]), None))
    assert client.stream.get() is not old and len(ids) == 24
