"""Every status tells the truth, end to end on real processes:

- a live duplicate request id sent through a second router is ALREADY_EXISTS (the engine that holds
  the request finds it; the router passes its status through), not UNAVAILABLE;
- INVALID_ARGUMENTs found by the engine or the tokenizer reach the router's client with their
  google.rpc BadRequest field violations;
- a request only an engine that is down right now could hold is UNAVAILABLE (retry), not
  INVALID_ARGUMENT, and the router's GetInfo max_model_len is what a configured engine can hold.
"""

from __future__ import annotations

import asyncio
import pathlib
import tempfile

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from kvmesh.serving.channels import create_channel
from kvmesh.v1 import (common_pb2, engine_pb2, engine_pb2_grpc, router_pb2, router_pb2_grpc, tokenizer_pb2,
                       tokenizer_pb2_grpc)
from tests.reliability.cluster import Cluster
from tests.router.client import generate, greedy, wait_replicas

pytestmark = pytest.mark.slow
BIG, SMALL = 40, 30  # KV blocks of 16 tokens: 640 tokens (more than max_model_len 512) and 480
HUGE = dict(token_ids=common_pb2.TokenIds(ids=[1, 30, 40]), sampling=greedy(500, ignore_eos=True))  # 32 blocks


@pytest.fixture(scope="module")
def mesh(stories260k_dir):
    """A tokenizer, a big and a small engine; router "both" over the two, "big" and "small" over one each."""
    c = Cluster(stories260k_dir, pathlib.Path(tempfile.mkdtemp(prefix="kvmesh-statuses-")))
    try:
        tok, big, small = c.tokenizer(), c.engine(BIG), c.engine(SMALL)
        c.wait_healthy(tok, big, small)
        routers = {"both": c.router(tok, [big, small]), "big": c.router(tok, [big]), "small": c.router(tok, [small])}
        c.wait_healthy(*routers.values())
        yield c, tok, big, small, routers
    finally:
        c.stop()


def _router(address: str):
    channel = create_channel(address)
    return channel, router_pb2_grpc.RouterStub(channel)


def _violations(exc: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    out, status = [], rpc_status.from_call(exc)
    for detail in status.details if status is not None else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.extend((v.field, v.description) for v in bad.field_violations)
    return out


async def test_live_duplicate_id_through_a_second_router_is_already_exists(mesh):
    _, _, _, _, routers = mesh
    (ch1, first), (ch2, second) = _router(routers["both"].address), _router(routers["big"].address)
    async with ch1, ch2:
        # 32 blocks: only the big engine holds it, so both routers send it there.
        live = first.Generate(router_pb2.RouterGenerateRequest(request_id="dup-1", **HUGE))
        await live.read()
        again = await generate(second, router_pb2.RouterGenerateRequest(request_id="dup-1", **HUGE))
        same_router = await generate(first, router_pb2.RouterGenerateRequest(request_id="dup-1", **HUGE))
        live.cancel()
        await asyncio.sleep(0.5)  # the engine aborts the cancelled request
        reused = await generate(second, router_pb2.RouterGenerateRequest(request_id="dup-1", text="Once",
                                                                         sampling=greedy(3)))
    assert again.status == grpc.StatusCode.ALREADY_EXISTS, (again.status, again.details)
    assert "dup-1" in again.details and "already live" in again.details
    assert same_router.status == grpc.StatusCode.ALREADY_EXISTS
    assert reused.status == grpc.StatusCode.OK and reused.last.request_id == "dup-1"  # reuse after the end is fine


async def test_engine_and_tokenizer_invalid_arguments_carry_bad_request_through_the_router(mesh):
    _, tok, big, _, routers = mesh
    channel, stub = _router(routers["both"].address)
    async with channel, create_channel(big.address) as ech, create_channel(tok.address) as tch:
        cases = {  # found by the engine, by the tokenizer (chat rendering)
            "sampling.repetition_penalty": router_pb2.RouterGenerateRequest(
                text="Once", sampling=common_pb2.SamplingParams(repetition_penalty=0.0)),
            "messages[0].role": router_pb2.RouterGenerateRequest(
                chat=router_pb2.ChatInput(messages=[common_pb2.ChatMessage(role="", content="hi")])),
        }
        for field, req in cases.items():
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Generate(req):
                    pass
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
            assert [f for f, _ in _violations(err.value)] == [field], (field, err.value.details())
        with pytest.raises(grpc.aio.AioRpcError) as err:  # and straight from the tiers themselves
            await engine_pb2_grpc.EngineStub(ech).Generate(engine_pb2.GenerateRequest(prompt_token_ids=[9999])).read()
        assert _violations(err.value)[0][0] == "prompt_token_ids"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await tokenizer_pb2_grpc.TokenizerStub(tch).Detokenize(tokenizer_pb2.DetokenizeRequest(token_ids=[9999]))
        assert _violations(err.value)[0][0] == "token_ids[0]"


async def test_a_request_only_a_down_engine_could_hold_is_unavailable_not_invalid(mesh):
    _, _, big, _, routers = mesh
    channel, stub = _router(routers["both"].address)
    small_channel, small_only = _router(routers["small"].address)
    async with channel, small_channel:
        info_up = await stub.GetInfo(common_pb2.GetInfoRequest())
        assert (await generate(stub, router_pb2.RouterGenerateRequest(**HUGE))).status == grpc.StatusCode.OK
        big.kill()  # last test of the module: the big engine stays down
        await wait_replicas(stub, 1)
        away = await generate(stub, router_pb2.RouterGenerateRequest(**HUGE))
        info_away = await stub.GetInfo(common_pb2.GetInfoRequest())
        # A router whose only engine holds 480 tokens advertises that, and says so for a longer request.
        small_info = await small_only.GetInfo(common_pb2.GetInfoRequest())
        too_long = await generate(small_only, router_pb2.RouterGenerateRequest(**HUGE))
    assert away.status == grpc.StatusCode.UNAVAILABLE, (away.status, away.details)
    assert "needs 32 KV blocks" in away.details and "unavailable now" in away.details
    assert info_up.max_model_len == info_away.max_model_len == 512
    assert small_info.max_model_len == SMALL * 16
    assert too_long.status == grpc.StatusCode.INVALID_ARGUMENT and "max_model_len 480" in too_long.details
