"""Small async client helpers shared by the end-to-end router tests."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import grpc

from kvmesh.serving.channels import create_channel
from kvmesh.v1 import common_pb2, engine_pb2, engine_pb2_grpc, router_pb2, router_pb2_grpc


@dataclass
class Result:
    """One router Generate stream, as the client saw it."""

    responses: list = field(default_factory=list)
    status: grpc.StatusCode = grpc.StatusCode.OK
    details: str = ""

    @property
    def text(self) -> str:
        return "".join(r.text for r in self.responses)

    @property
    def token_ids(self) -> list[int]:
        return [t.id for r in self.responses for t in r.tokens]

    @property
    def last(self) -> router_pb2.RouterGenerateResponse:
        return self.responses[-1]

    @property
    def engine_id(self) -> str:
        return self.responses[0].engine_id if self.responses else ""


async def generate(stub: router_pb2_grpc.RouterStub, req: router_pb2.RouterGenerateRequest,
                   timeout: float = 120.0) -> Result:
    result = Result()
    try:
        async for resp in stub.Generate(req, timeout=timeout):
            result.responses.append(resp)
    except grpc.aio.AioRpcError as exc:
        result.status, result.details = exc.code(), exc.details()
    return result


def greedy(max_tokens: int, **kw) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


async def engine_load(address: str) -> common_pb2.LoadReport:
    async with create_channel(address) as channel:
        return await engine_pb2_grpc.EngineStub(channel).GetLoad(engine_pb2.GetLoadRequest(), timeout=10)


async def engines_idle(addresses: list[str], timeout_s: float = 60.0) -> dict[str, common_pb2.LoadReport]:
    """Wait until every engine has all its blocks free and nothing running or waiting; return the loads."""
    deadline = time.monotonic() + timeout_s
    while True:
        loads = {a: await engine_load(a) for a in addresses}
        if all(r.free_blocks + r.cached_blocks == r.total_blocks and r.num_running_requests == 0
               and r.num_waiting_requests == 0 for r in loads.values()):
            return loads
        if time.monotonic() > deadline:
            return loads  # the caller's assertion shows what is left
        await asyncio.sleep(0.1)


async def wait_replicas(stub: router_pb2_grpc.RouterStub, n: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        models = await stub.ListModels(router_pb2.ListModelsRequest())
        if models.models and models.models[0].num_ready_replicas == n:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"router did not see {n} ready engines in {timeout_s:.0f}s")


@contextlib.asynccontextmanager
async def router_stub(address: str, num_replicas: int):
    """A RouterStub on its own channel, once the router sees `num_replicas` ready engines."""
    async with create_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        await wait_replicas(stub, num_replicas)
        yield stub
