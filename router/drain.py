"""The router's drain: in-flight Generate streams get the grace period, then end with a typed error.

Without this, the end of `server.stop(grace)` cancels every call with gRPC's generic "Cancelling all
calls", which tells a client neither that the router is going away nor that another router would
serve it. Here each stream still open when the grace runs out is cancelled by the router itself and
ends with one terminal response carrying a DRAINING StreamError (code UNAVAILABLE), or with an
UNAVAILABLE status when nothing was sent yet. The engine calls are cancelled on the way (the
orchestrator's `finally`), so the engines free those requests' blocks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from kvmesh.serving.errors import Unavailable
from kvmesh.v1 import common_pb2, router_pb2

log = logging.getLogger(__name__)

# After cancelling the streams left at the end of the grace: how long they get to send their last response.
EXPIRY_WAIT_S = 2.0


class StreamDrain:
    """Tracks the tasks serving Generate streams; `drain(grace_s)` waits for them, then ends the rest."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()
        self._expired = False

    @property
    def num_streams(self) -> int:
        return len(self._tasks)

    async def guard(self, responses: AsyncIterator[router_pb2.RouterGenerateResponse]
                    ) -> AsyncIterator[router_pb2.RouterGenerateResponse]:
        """Relay one stream's responses; when the drain expires, end it with a DRAINING error."""
        task = asyncio.current_task()
        self._tasks.add(task)
        request_id = None
        try:
            async for out in responses:
                request_id = out.request_id
                yield out
        except asyncio.CancelledError:
            if not self._expired:
                raise  # the client went away
            task.uncancel()  # the router's own cancel: answer instead of vanishing
            if request_id is None:
                raise Unavailable("the router is shutting down (drain grace ran out): retry on another router") \
                    from None
            yield _draining_response(request_id)
        finally:
            self._tasks.discard(task)
            await responses.aclose()  # the client went away: the orchestrator's `finally` runs now, not at GC

    async def drain(self, grace_s: float) -> None:
        """Wait up to grace_s for the open streams; then end what is left with a DRAINING error."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self._tasks and loop.time() < deadline:
            await asyncio.wait(set(self._tasks), timeout=deadline - loop.time())
        if not self._tasks:
            return
        log.warning("drain grace of %.1fs ran out: ending %d stream(s)", grace_s, len(self._tasks))
        self._expired = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.wait(set(self._tasks), timeout=EXPIRY_WAIT_S)


def _draining_response(request_id: str) -> router_pb2.RouterGenerateResponse:
    return router_pb2.RouterGenerateResponse(
        request_id=request_id, finish_reason=common_pb2.FINISH_REASON_ERROR,
        error=common_pb2.StreamError(
            code=grpc.StatusCode.UNAVAILABLE.value[0], reason=common_pb2.ERROR_REASON_DRAINING,
            message="the router is shutting down (drain grace ran out): retry on another router"))
