"""One TokenizeStream call: many Tokenize calls on one stream, answered as they finish.

A short text is encoded inline as its message is read (tens of microseconds), so the results of one
message's short texts go out together; a long one is encoded off the event loop and answered on its
own when done. A refused item gets its result with the status Tokenize would have raised.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from kvmesh.serving.errors import ServiceError, internal_error
from kvmesh.v1 import tokenizer_pb2

def _refused(item_id: int, err: ServiceError) -> tokenizer_pb2.TokenizeResult:
    return tokenizer_pb2.TokenizeResult(item_id=item_id, error_code=err.code.value[0], error_message=err.message,
                                        error_details=err.packed_details())


class TokenizeSession:
    """Runs one TokenizeStream: `inline(request)` returns the ids of a short text or None (encode it
    with `offload(request)`, awaitable); both raise ServiceError for a refused request."""

    def __init__(self, inline: Callable[[tokenizer_pb2.TokenizeRequest], list[int] | None],
                 offload: Callable[[tokenizer_pb2.TokenizeRequest], Awaitable[list[int]]]):
        self._inline = inline
        self._offload = offload
        self._done: list[tokenizer_pb2.TokenizeResult] = []  # results not sent yet
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()  # long texts being encoded

    async def run(self, request_iterator):
        reader = asyncio.create_task(self._read(request_iterator), name="tokenize-stream-reader")
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self._done:
                    done, self._done = self._done, []
                    yield tokenizer_pb2.TokenizeStreamResponse(results=done)
                if reader.done():
                    if reader.exception() is not None:
                        raise reader.exception()
                    if not self._tasks and not self._done:
                        return  # the client half-closed and every item is answered
        finally:
            reader.cancel()
            for task in [reader, *self._tasks]:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _read(self, request_iterator) -> None:
        try:
            async for message in request_iterator:
                for item in message.items:
                    self._start(item)
        finally:
            self._wake.set()

    def _start(self, item: tokenizer_pb2.TokenizeItem) -> None:
        try:
            ids = self._inline(item.request)
        except ServiceError as err:
            self._finish(_refused(item.item_id, err))
            return
        if ids is not None:
            self._finish(tokenizer_pb2.TokenizeResult(item_id=item.item_id, token_ids=ids))
            return
        task = asyncio.create_task(self._encode(item))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _encode(self, item: tokenizer_pb2.TokenizeItem) -> None:
        try:
            result = tokenizer_pb2.TokenizeResult(item_id=item.item_id, token_ids=await self._offload(item.request))
        except ServiceError as err:
            result = _refused(item.item_id, err)
        except Exception as exc:  # noqa: BLE001 - one item's failure is not the stream's
            result = _refused(item.item_id, internal_error("TokenizeStream", exc))
        self._finish(result)

    def _finish(self, result: tokenizer_pb2.TokenizeResult) -> None:
        self._done.append(result)
        self._wake.set()
