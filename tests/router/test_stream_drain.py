"""router/drain.StreamDrain on its own: when the grace runs out, every open stream ends with one
DRAINING response, wherever its task is suspended at that moment (tests/reliability/test_drain.py
checks the same through a real router process)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from kvmesh.serving.errors import Unavailable
from kvmesh.v1 import common_pb2, router_pb2
from router.drain import StreamDrain


async def endless(request_id: str, closed: list[str]):
    try:
        while True:
            await asyncio.sleep(0.001)
            yield router_pb2.RouterGenerateResponse(request_id=request_id)
    finally:
        closed.append(request_id)


async def consume(drain: StreamDrain, upstream, write_s: float) -> list:
    """A handler relaying the guarded stream as router/servicer.py does (closed when the handler
    ends, however it ends); each response's 'write' takes write_s (as gRPC's does)."""
    got = []
    async with contextlib.aclosing(drain.guard(upstream)) as responses:
        async for out in responses:
            got.append(out)
            await asyncio.sleep(write_s)
    return got


@pytest.mark.parametrize("write_s", [0.0, 0.05])
async def test_expiry_answers_streams_suspended_upstream_or_in_a_write(write_s):
    # write_s 0.05: the drain expires while the handler is in its write, outside the guard; a cancel
    # there ended the stream with no answer (the flaky UNAVAILABLE "Cancelling all calls" of CI runs)
    drain, closed = StreamDrain(), []
    handlers = [asyncio.create_task(consume(drain, endless(f"r{i}", closed), write_s)) for i in range(3)]
    await asyncio.sleep(0.1)
    assert drain.num_streams == 3
    await drain.drain(0.05)
    for h in handlers:
        got = await asyncio.wait_for(h, 1)
        last = got[-1]
        assert last.finish_reason == common_pb2.FINISH_REASON_ERROR
        assert last.error.reason == common_pb2.ERROR_REASON_DRAINING and last.error.code == 14
        assert all(not r.HasField("error") for r in got[:-1])
    assert sorted(closed) == ["r0", "r1", "r2"] and drain.num_streams == 0


async def test_expiry_before_the_first_response_is_unavailable():
    drain, closed = StreamDrain(), []

    async def silent():
        try:
            await asyncio.sleep(3600)
            yield router_pb2.RouterGenerateResponse()
        finally:
            closed.append("silent")

    handler = asyncio.create_task(consume(drain, silent(), 0.0))
    await asyncio.sleep(0.05)
    await drain.drain(0.01)
    with pytest.raises(Unavailable, match="shutting down"):
        await asyncio.wait_for(handler, 1)
    assert closed == ["silent"]


async def test_streams_that_finish_within_the_grace_are_untouched():
    drain = StreamDrain()

    async def short():
        for i in range(3):
            yield router_pb2.RouterGenerateResponse(request_id=f"s{i}")

    handler = asyncio.create_task(consume(drain, short(), 0.01))
    await drain.drain(1.0)
    assert [r.request_id for r in await handler] == ["s0", "s1", "s2"]


async def test_a_client_cancel_is_not_answered():
    drain, closed = StreamDrain(), []
    handler = asyncio.create_task(consume(drain, endless("c", closed), 0.0))
    await asyncio.sleep(0.05)
    handler.cancel()
    with pytest.raises(asyncio.CancelledError):
        await handler
    assert closed == ["c"] and drain.num_streams == 0
