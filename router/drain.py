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


class _Stream:
    """One guarded stream: whether it is waiting for its next upstream response right now."""

    __slots__ = ("waiting",)

    def __init__(self) -> None:
        self.waiting = False


class StreamDrain:
    """Tracks the tasks serving Generate streams; `drain(grace_s)` waits for them, then ends the rest."""

    def __init__(self) -> None:
        self._tasks: dict[asyncio.Task, _Stream] = {}
        self._expired = False

    @property
    def num_streams(self) -> int:
        return len(self._tasks)

    async def guard(self, responses: AsyncIterator[router_pb2.RouterGenerateResponse]
                    ) -> AsyncIterator[router_pb2.RouterGenerateResponse]:
        """Relay one stream's responses; when the drain expires, end it with a DRAINING error.

        The drain cancels a stream's task only while it waits here for its next upstream response.
        A task suspended at ``yield`` is inside gRPC's write of the previous response, where a
        cancel would end the call without the DRAINING answer (the server's stop then reported
        "Cancelling all calls"); such a stream sees the expiry when the write returns.
        """
        task = asyncio.current_task()
        stream = self._tasks[task] = _Stream()
        request_id = None
        upstream = responses.__aiter__()
        try:
            while not self._expired:
                stream.waiting = True
                try:
                    out = await upstream.__anext__()
                except StopAsyncIteration:
                    return
                finally:
                    stream.waiting = False
                request_id = out.request_id
                yield out
            yield self._expiry_answer(request_id)
        except asyncio.CancelledError:
            if not self._expired:
                raise  # the client went away
            task.uncancel()  # the router's own cancel: answer instead of vanishing
            yield self._expiry_answer(request_id)
        finally:
            self._tasks.pop(task, None)
            await responses.aclose()  # the client went away: the orchestrator's `finally` runs now, not at GC

    @staticmethod
    def _expiry_answer(request_id: str | None) -> router_pb2.RouterGenerateResponse:
        if request_id is None:
            raise Unavailable("the router is shutting down (drain grace ran out): retry on another router")
        return _draining_response(request_id)

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
        for task, stream in list(self._tasks.items()):
            if stream.waiting:
                task.cancel()
        await asyncio.wait(set(self._tasks), timeout=EXPIRY_WAIT_S)


def _draining_response(request_id: str) -> router_pb2.RouterGenerateResponse:
    return router_pb2.RouterGenerateResponse(
        request_id=request_id, finish_reason=common_pb2.FINISH_REASON_ERROR,
        error=common_pb2.StreamError(
            code=grpc.StatusCode.UNAVAILABLE.value[0], reason=common_pb2.ERROR_REASON_DRAINING,
            message="the router is shutting down (drain grace ran out): retry on another router"))
