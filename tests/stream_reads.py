"""Reading the rest of a grpc.aio server stream after read() calls.

A plain grpc.aio call does not mix read() with `async for` (UsageError); with tracing off no
interceptor wraps the call, so tests that read a first response with read() read the rest the same way.
"""

from __future__ import annotations

import grpc


async def read_rest(call) -> list:
    """The responses after those already taken with read(), until the stream ends."""
    out = []
    while (r := await call.read()) is not grpc.aio.EOF:
        out.append(r)
    return out
