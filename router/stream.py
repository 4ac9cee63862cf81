"""The committed part of a request: engine responses -> detokenizer -> client responses.

The engine's responses gather in an inbox as fast as they arrive (the shared GenerateStream's
reader queues them on the request's StreamedCall; a Generate call is drained by a reader task of
its own), so the router never holds the engine back and never falls behind it: while one batch of
ids is with the detokenizer, the next responses gather and go to the detokenizer as one batch. A stop-string match
is therefore seen one detokenizer round trip after the engine emitted the token, and the engine is
aborted at once.

After the first response reached the client nothing is resent: an engine failure ends the stream
with one response carrying a StreamError (ENGINE_LOST, code UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc

from kvmesh.serving.errors import ServiceError
from kvmesh.v1 import common_pb2, engine_pb2, router_pb2
from router.engine_client import EngineClient
from router.engine_stream import StreamedCall
from router.tokenizer_client import DetokenizeCall

log = logging.getLogger(__name__)

# After a stop-string match: how long to wait for the aborted engine stream to report its final
# token count before cancelling it outright.
STOP_DRAIN_S = 2.0
_END = grpc.aio.EOF  # the engine stream ended (normally it ends right after a finish_reason)


class CommittedStream:
    def __init__(self, req: router_pb2.RouterGenerateRequest, request_id: str, num_prompt_tokens: int,
                 engine: EngineClient, call, detok: DetokenizeCall):
        self.req = req
        self.request_id = request_id
        self.num_prompt_tokens = num_prompt_tokens
        self.engine = engine
        self.call = call
        self.detok = detok
        self.num_tokens = 0  # generated tokens received from the engine
        # A request on the shared GenerateStream queues its responses itself (StreamedCall.next_batch);
        # a Generate call is drained into this inbox by a reader task.
        self._shared = isinstance(call, StreamedCall)
        self._inbox: asyncio.Queue = asyncio.Queue()  # GenerateResponse, then _END or an AioRpcError

    async def _read_engine(self) -> None:
        # read(), not `async for`: the first response was read with read(), and a plain grpc.aio
        # call refuses to mix the two styles.
        try:
            while (resp := await self.call.read()) is not grpc.aio.EOF:
                self._inbox.put_nowait(resp)
            self._inbox.put_nowait(_END)
        except grpc.aio.AioRpcError as exc:
            self._inbox.put_nowait(exc)

    async def _next_batch(self) -> list:
        """Everything the engine sent since the last batch (at least one item; ends at a terminal one)."""
        if self._shared:
            return await self.call.next_batch()
        items = [await self._inbox.get()]
        while not self._inbox.empty() and isinstance(items[-1], engine_pb2.GenerateResponse) \
                and not items[-1].finish_reason:
            items.append(self._inbox.get_nowait())
        return items

    async def run(self, first: engine_pb2.GenerateResponse) -> AsyncIterator[router_pb2.RouterGenerateResponse]:
        reader = None if self._shared else asyncio.create_task(self._read_engine(),
                                                                name=f"engine-reader-{self.request_id}")
        try:
            # Closed here, not left to the garbage collector: a relay finalized later runs its
            # cleanup in a stray task (logged as destroyed-while-pending at shutdown).
            async with contextlib.aclosing(self._relay([first])) as relay:
                async for out in relay:
                    yield out
        finally:
            if reader is not None:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader

    async def _relay(self, items: list) -> AsyncIterator[router_pb2.RouterGenerateResponse]:
        e = self.engine
        is_first = True
        while True:
            tail = None if isinstance(items[-1], engine_pb2.GenerateResponse) else items[-1]
            responses = items if tail is None else items[:-1]
            out = router_pb2.RouterGenerateResponse(request_id=self.request_id)
            if is_first:
                # Only the first and the last response carry a load report (include_load).
                e.first_response(self.request_id, responses[0])
                out.engine_id = e.engine_id
            last = responses[-1] if responses else None
            finished = last is not None and last.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
            if finished:
                e.last_response(last)
            try:
                tokens = [t for r in responses for t in r.tokens]
                if tokens and await self._tokens(tokens, out, finished):
                    yield out
                    return
                if finished:
                    await self._finish(last, out)
                    yield out
                    return
            except (grpc.aio.AioRpcError, ServiceError) as exc:
                yield self._error(out, "tokenizer", exc)
                return
            if tail is _END:
                yield self._lost("the engine ended the stream without a finish reason", out)
                return
            if tail is not None:
                yield self._error(out, "engine", tail)
                return
            if is_first or out.text or out.tokens:
                yield out
            is_first = False
            items = await self._next_batch()

    def _usage(self, completion: int | None = None) -> common_pb2.Usage:
        return common_pb2.Usage(prompt_tokens=self.num_prompt_tokens,
                                completion_tokens=self.num_tokens if completion is None else completion)

    async def _tokens(self, tokens: list[common_pb2.Token], out, last: bool) -> bool:
        """Detokenize a batch of tokens into `out`; the `last` batch also flushes the detokenizer
        (one round trip for both). Returns True when a stop string matched (out is final)."""
        self.num_tokens += len(tokens)
        det = await self.detok.push([t.id for t in tokens], finish=last)
        out.text = det.text
        match = det.stop_match if det.HasField("stop_match") else None
        if self.req.return_tokens:
            out.tokens.extend(t for t in tokens if match is None or t.index <= match.token_index)
        if match is None:
            return False
        completion = await self._stop_engine(match.token_index)
        out.finish_reason = common_pb2.FINISH_REASON_STOP_STRING
        out.matched_stop_string = match.stop
        out.usage.CopyFrom(self._usage(completion))
        return True

    async def _finish(self, resp: engine_pb2.GenerateResponse, out) -> None:
        if not self.detok.done:
            tail = await self.detok.finish()
            out.text += tail.text
        out.finish_reason = resp.finish_reason
        if resp.HasField("matched_stop_token_id"):
            out.matched_stop_token_id = resp.matched_stop_token_id
        if resp.HasField("error"):
            out.error.CopyFrom(resp.error)
        completion = resp.usage.completion_tokens if resp.HasField("usage") else None
        out.usage.CopyFrom(self._usage(completion or self.num_tokens))
        out.usage.cached_prompt_tokens = resp.usage.cached_prompt_tokens  # the engine's prefix-cache hit

    async def _stop_engine(self, match_index: int) -> int:
        """Abort the engine request at once, then read its stream out to learn how many tokens it
        generated in all (usage counts them: the client pays for what the engine computed). Returns that count."""
        self.engine.abort(self.request_id, self.call)
        count = self.num_tokens
        try:
            async with asyncio.timeout(STOP_DRAIN_S):
                count = await self._drain_count(count)
        except TimeoutError:
            pass
        log.debug("request %s: stop string completed by token %d; the engine generated %d",
                  self.request_id, match_index, count)
        self.call.cancel()
        return count

    async def _drain_count(self, count: int) -> int:
        """Read the engine's responses up to its last; the tokens it generated in all."""
        while True:
            for item in await self._next_batch():
                if not isinstance(item, engine_pb2.GenerateResponse):
                    return count
                count += len(item.tokens)
                if item.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                    self.engine.last_response(item)
                    if item.HasField("usage") and item.usage.completion_tokens:
                        return item.usage.completion_tokens
                    return count

    def _error(self, out, where: str, exc: Exception) -> router_pb2.RouterGenerateResponse:
        """The one terminal response for a failure after the first response."""
        out.finish_reason = common_pb2.FINISH_REASON_ERROR
        out.usage.CopyFrom(self._usage())
        code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else exc.code
        details = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else exc.message
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            out.error.CopyFrom(common_pb2.StreamError(
                code=code.value[0], reason=common_pb2.ERROR_REASON_DEADLINE_EXCEEDED,
                message=f"deadline exceeded after {self.num_tokens} tokens"))
        elif where == "engine":
            self.engine.eject(f"Generate stream failed: {code.name}: {details}", recheck=True)
            return self._lost(f"{code.name}: {details}", out)
        else:
            out.error.CopyFrom(common_pb2.StreamError(
                code=grpc.StatusCode.UNAVAILABLE.value[0], reason=common_pb2.ERROR_REASON_INTERNAL,
                message=f"{where} failed after {self.num_tokens} tokens: {code.name}: {details}"))
        log.warning("request %s ended with an error: %s", self.request_id, out.error.message)
        return out

    def _lost(self, why: str, out) -> router_pb2.RouterGenerateResponse:
        out.finish_reason = common_pb2.FINISH_REASON_ERROR
        out.usage.CopyFrom(self._usage())
        out.error.CopyFrom(common_pb2.StreamError(
            code=grpc.StatusCode.UNAVAILABLE.value[0], reason=common_pb2.ERROR_REASON_ENGINE_LOST,
            message=f"engine {self.engine.address} lost after {self.num_tokens} tokens: {why}"))
        log.warning("request %s: %s", self.request_id, out.error.message)
        return out
