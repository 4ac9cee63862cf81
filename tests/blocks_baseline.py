"""The engine's KV blocks back at their baseline: the check after every failing or cancelled request."""

from __future__ import annotations

import asyncio
import contextlib

from kvmesh.serving.channels import create_channel
from kvmesh.v1 import engine_pb2_grpc


async def assert_blocks_baseline(server, num_blocks: int, timeout: float = 5.0) -> None:
    """No block of an in-process EngineServer in use (all free, or cached: evictable prefix blocks),
    nothing running, waiting or live, waiting at most `timeout` seconds for the engine thread."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        load = server.engine.load
        if load.in_use_blocks == 0 and load.free_blocks + load.cached_blocks == num_blocks \
                and load.num_running_requests == load.num_waiting_requests == 0 and server.engine.num_live == 0:
            return
        await server.engine.wait_load_change(0.05)
    raise AssertionError(f"blocks did not return to baseline: {server.engine.load}")


@contextlib.asynccontextmanager
async def checked_engine_stub(server, num_blocks: int):
    """An Engine stub on its own channel to an in-process EngineServer; on the way out (after the
    test), the blocks are back at baseline."""
    async with create_channel(f"127.0.0.1:{server.port}") as ch:
        yield engine_pb2_grpc.EngineStub(ch)
    await assert_blocks_baseline(server, num_blocks)
