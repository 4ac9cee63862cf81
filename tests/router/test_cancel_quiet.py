"""Cancelled requests leave nothing behind for asyncio to complain about: no task destroyed while
pending, no async generator closed while it runs, no task exception never retrieved (the router's
log noise on cancels). Every cleanup runs inside the request, not later at garbage collection."""

from __future__ import annotations

import asyncio
import gc

import grpc
import pytest

from tests.router.fakes import FakeEngine
from tests.router.test_orchestration import Harness, text_req


async def _settle(fake: FakeEngine) -> None:
    for _ in range(100):
        if not fake.live:
            break
        await asyncio.sleep(0.02)
    for _ in range(3):  # finalizers of anything left unclosed run (and would complain) now
        gc.collect()
        await asyncio.sleep(0.05)


async def test_cancels_log_nothing_from_asyncio():
    loop = asyncio.get_running_loop()
    complaints: list[str] = []
    loop.set_exception_handler(lambda _loop, context: complaints.append(
        f"{context.get('message')}: {context.get('exception')!r}"))
    fake = FakeEngine("e0", step_s=0.01)
    async with Harness([fake]) as h:
        for i in range(3):  # the client cancels mid-stream
            call = h.stub.Generate(text_req(max_tokens=200, request_id=f"c{i}"))
            await call.read()
            await call.read()
            call.cancel()
            await _settle(fake)
        with pytest.raises(grpc.aio.AioRpcError):  # a deadline mid-stream
            await h.collect(text_req(max_tokens=200), timeout=0.3)
        await _settle(fake)
        out = await h.collect(text_req("abcdefgh", 50, stop=["cd"]))  # a stop string aborts the engine
        assert out[-1].matched_stop_string == "cd"
        await h.collect(text_req(max_tokens=3))  # and a request that simply finishes
        await _settle(fake)
        assert len(fake.cancelled) >= 4 and not fake.live
        assert h.router.pool.engines[h.addrs[0]].in_flight == 0
    await asyncio.sleep(0.1)
    gc.collect()
    assert complaints == []
