"""The router's side of tokenizer_svc: prompt ids for each input kind (a text on the shared
TokenizeStream, router.tokenize_stream, when it is on), and one detokenize session per request: on
the shared DetokenizeSessions stream (router.detokenize_sessions) when it is on, else on a
DetokenizeStream of its own."""

from __future__ import annotations

import asyncio

import grpc

from kvmesh.serving.errors import ServiceError, Unavailable, passed_through
from kvmesh.v1 import common_pb2, router_pb2, tokenizer_pb2, tokenizer_pb2_grpc
from router.detokenize_sessions import DetokenizeSessions, SharedSession, start_message
from router.shared_call import CurrentCall
from router.tokenize_stream import TokenizeStream, tokenize

# Statuses from the tokenizer that describe the caller's input: passed to the client as they are.
# ALREADY_EXISTS is the engine's: a live duplicate request id sent through another router.
_CALLER_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                 grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND,
                 grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
                 grpc.StatusCode.ALREADY_EXISTS}


def downstream_error(service: str, exc: grpc.aio.AioRpcError) -> ServiceError:
    """A downstream failure as the error the router's client gets: caller errors keep their status,
    message and google.rpc details; anything else is UNAVAILABLE naming the tier."""
    if exc.code() in _CALLER_CODES:
        return passed_through(exc)
    return Unavailable(f"{service} unavailable: {exc.code().name}: {exc.details()}")


class TokenizerClient:
    def __init__(self, channel: grpc.aio.Channel):
        self.stub = tokenizer_pb2_grpc.TokenizerStub(channel)
        self.sessions: DetokenizeSessions | None = None  # the shared stream, once use_shared_sessions()
        self.tokenize_stream: CurrentCall[TokenizeStream] | None = None  # once use_tokenize_stream()

    def use_tokenize_stream(self) -> None:
        """Tokenize every text on one shared TokenizeStream (the tokenizer offers it)."""
        if self.tokenize_stream is None:
            self.tokenize_stream = CurrentCall(lambda: TokenizeStream(self.stub))

    def use_shared_sessions(self) -> None:
        """Detokenize every request on one shared DetokenizeSessions stream (the tokenizer offers it)."""
        if self.sessions is None:
            self.sessions = DetokenizeSessions(self.stub)

    async def prompt_ids(self, request: router_pb2.RouterGenerateRequest, timeout: float | None) -> list[int]:
        """Token ids for the request's input (text, chat or ids). Raises ServiceError."""
        kind = request.WhichOneof("input")
        try:
            if kind == "text" and self.tokenize_stream is not None:
                return await tokenize(self.tokenize_stream.get(), request.text, timeout, _CALLER_CODES)
            if kind == "text":
                reply = await self.stub.Tokenize(tokenizer_pb2.TokenizeRequest(text=request.text),
                                                 timeout=timeout)
                return list(reply.token_ids)
            if kind == "chat":
                chat = request.chat
                req = tokenizer_pb2.ApplyChatTemplateRequest(messages=chat.messages, tools_json=chat.tools_json,
                                                             tokenize=True)
                if chat.HasField("add_generation_prompt"):
                    req.add_generation_prompt = chat.add_generation_prompt
                if chat.HasField("template_kwargs_json"):
                    req.template_kwargs_json = chat.template_kwargs_json
                reply = await self.stub.ApplyChatTemplate(req, timeout=timeout)
                return list(reply.token_ids)
        except grpc.aio.AioRpcError as exc:
            raise downstream_error("tokenizer", exc) from None
        assert kind == "token_ids", kind
        return list(request.token_ids.ids)

    def detokenizer(self, timeout: float | None) -> "DetokenizeCall | SharedSession":
        if self.sessions is not None:
            return self.sessions.session(timeout)
        return DetokenizeCall(self.stub.DetokenizeStream(timeout=timeout))

    async def close(self) -> None:
        if self.sessions is not None:
            await self.sessions.close()
        if self.tokenize_stream is not None:
            await self.tokenize_stream.close()


class DetokenizeCall:
    """One DetokenizeStream: start, then one reply per batch of ids, then finish. Lockstep by contract."""

    def __init__(self, call):
        self._call = call
        self.done = False

    async def start(self, prompt_ids: list[int], request: router_pb2.RouterGenerateRequest) -> None:
        await self._call.write(tokenizer_pb2.DetokenizeStreamRequest(start=start_message(prompt_ids, request)))

    async def push(self, ids: list[int], finish: bool = False) -> tokenizer_pb2.DetokenizeStreamResponse:
        """Detokenize a batch of ids; with finish, the last batch: the finish follows its answer
        (lockstep: after a stop match the stream is over and takes no finish), one answer for both."""
        await self._call.write(tokenizer_pb2.DetokenizeStreamRequest(tokens=common_pb2.TokenIds(ids=ids)))
        reply = await self._read()
        if finish and not reply.done:
            tail = await self.finish()
            tail.text = reply.text + tail.text
            return tail
        return reply

    async def finish(self) -> tokenizer_pb2.DetokenizeStreamResponse:
        """Flush text held back; the stream ends."""
        await self._call.write(tokenizer_pb2.DetokenizeStreamRequest(finish=True))
        return await self._read()

    async def _read(self) -> tokenizer_pb2.DetokenizeStreamResponse:
        reply = await self._call.read()
        if reply is grpc.aio.EOF:
            raise Unavailable("tokenizer ended the detokenize stream early")
        if reply.done:
            self.done = True
        return reply

    async def close(self) -> None:
        """End the stream: half-close it when it finished (so grpc's request pump ends cleanly), else cancel."""
        if self.done:
            try:
                await asyncio.wait_for(self._call.done_writing(), 1.0)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError, TimeoutError):
                pass
        self._call.cancel()
