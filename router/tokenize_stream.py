"""The router's Tokenize calls on one shared TokenizeStream per tokenizer channel.

A unary Tokenize costs a round trip of about 1.3 ms on a small host against about 0.7 ms for a
message pair on an open stream (bench/grpc_floor.py), on every request's path to its first token.
Here the texts of all requests that arrived since the last write go out in one message and each
gets its result back tagged. When the stream fails, every text waiting on it fails with UNAVAILABLE
naming the status, and the next one opens a new stream (router.shared_call.CurrentCall).
"""

from __future__ import annotations

import asyncio
import itertools

import grpc

from kvmesh.serving.errors import DeadlineExceeded, ServiceError, Unavailable, with_status
from kvmesh.serving.event_loop import deadline_timer_s
from kvmesh.v1 import tokenizer_pb2
from router.shared_call import SharedCall


class TokenizeStream(SharedCall):
    """One TokenizeStream call with its writer and reader tasks. Lives until it fails or is closed."""

    def __init__(self, stub):
        self._call = stub.TokenizeStream()
        self._peer = "tokenizer"
        self._ids = itertools.count(1)
        self._pending: list[tokenizer_pb2.TokenizeItem] = []  # to go out with the next message
        self._waiting: dict[int, asyncio.Future] = {}  # item id -> its result, once answered
        self.failure: ServiceError | None = None
        self._start_tasks("tokenize-stream")

    def tokenize(self, request: tokenizer_pb2.TokenizeRequest) -> asyncio.Future:
        """Queue a text for the next message; the future gets its TokenizeResult (or the stream's failure)."""
        if self.failure is not None:
            raise self.failure
        item = tokenizer_pb2.TokenizeItem(item_id=next(self._ids), request=request)
        future = asyncio.get_running_loop().create_future()
        self._pending.append(item)
        self._waiting[item.item_id] = future
        self._wake.set()
        return future

    def _outgoing(self):
        if self._pending:
            items, self._pending = self._pending, []
            yield tokenizer_pb2.TokenizeStreamRequest(items=items)

    def _on_message(self, response: tokenizer_pb2.TokenizeStreamResponse) -> None:
        for result in response.results:
            future = self._waiting.pop(result.item_id, None)
            if future is not None and not future.done():  # done: its caller gave up (deadline)
                future.set_result(result)

    def _fail(self, why: str) -> None:
        if self.failure is not None:
            return
        self.failure = Unavailable(f"tokenizer unavailable: its TokenizeStream failed: {why}")
        self._fail_all(self.failure, self._waiting, "texts")
        self._pending.clear()
        self._call.cancel()


async def tokenize(stream: TokenizeStream, text: str, timeout: float | None,
                   caller_codes: set[grpc.StatusCode]) -> list[int]:
    """The ids of `text` via the shared stream, or the ServiceError its Tokenize call would have
    become (caller errors keep their status and details; anything else is UNAVAILABLE)."""
    future = stream.tokenize(tokenizer_pb2.TokenizeRequest(text=text))
    try:
        async with asyncio.timeout(deadline_timer_s(timeout)):
            result = await future
    except TimeoutError:
        raise DeadlineExceeded("deadline exceeded while the tokenizer tokenized") from None
    if not result.error_code:
        return list(result.token_ids)
    err = with_status(result.error_code, result.error_message, result.error_details)
    if err.code not in caller_codes:
        raise Unavailable(f"tokenizer unavailable: {err.code.name}: {result.error_message}")
    raise err
