"""One GenerateStream call: many requests on one stream, the outputs of each step in one message.

A Python gRPC message costs about 100 us of CPU on each side (bench/grpc_floor.py: a relay of 64
streams costs the backend 164 us per token with a stream per request, 24 us with one multiplexed
stream). Here the engine loop delivers a step's outputs to the session (its OutputSink) in one
callback; the session's writer wakes after that callback and sends everything queued since its
last message as one GenerateStreamResponse, one GenerateResponse per request, built as Generate
builds them (EngineService.fill_response), one LoadReport shared by every first or last response.

Per request, Generate's contract holds: validation and admission (a refusal is that request's
rejection with its own status; the stream goes on), a cancel message aborts at the next step
boundary and frees the blocks, and the finished output is the request's last response. When the
call ends for any reason but its own completion (client cancel, broken connection, a malformed
message), every request still live on it is aborted, so its blocks go back at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from kvmesh.serving.errors import InvalidArgument, ServiceError, internal_error
from kvmesh.v1 import engine_pb2

from engine_svc.core.hooks import EngineHooks
from engine_svc.core.request import Request, RequestOutput

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Live:
    """A request admitted on this stream and not finished."""

    req: Request
    include_load: bool
    first: bool = True  # no response sent yet


class GenerateSession:
    """The requests of one GenerateStream call. `run()` is the handler's response stream; the engine
    loop puts outputs in with `put_nowait` (the session is every one of its requests' OutputSink)."""

    def __init__(self, service, hooks: EngineHooks):
        self._service = service  # the EngineService: admission, response building, load reports
        self._hooks = hooks
        self._live: dict[str, _Live] = {}
        self._queued: dict[str, list[RequestOutput]] = {}  # outputs not sent yet, per request
        self._rejections: list[engine_pb2.RequestRejection] = []
        self._wake = asyncio.Event()
        self._client_done = False  # the client half-closed: no more requests will come

    def wake(self) -> None:
        self._wake.set()

    def put_nowait(self, output: RequestOutput) -> None:
        """OutputSink: an output of one of this stream's requests (event loop, once per step each)."""
        queued = self._queued.get(output.request_id)
        if queued is None:
            self._queued[output.request_id] = [output]
        else:
            queued.append(output)
        self._wake.set()

    async def run(self, request_iterator):
        """Yield a message whenever outputs or rejections are queued; end when the client has
        half-closed (or the engine drains) and no request is live."""
        reader = asyncio.create_task(self._read(request_iterator), name="generate-stream-reader")
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if reader.done() and reader.exception() is not None:
                    raise reader.exception()  # a malformed message: the stream's status
                if self._queued or self._rejections:
                    yield self._message()
                if not self._live and not self._queued and (self._client_done or self._service.draining):
                    return
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            self._abort_live()

    async def _read(self, request_iterator) -> None:
        try:
            async for message in request_iterator:
                for request in message.requests:
                    self._start(request)
                for request_id in message.cancel_request_ids:
                    self._cancel(request_id)
            self._client_done = True
        finally:
            self._wake.set()

    def _start(self, request: engine_pb2.GenerateRequest) -> None:
        """Admit one request, or queue its rejection."""
        try:
            if not request.request_id:
                raise InvalidArgument("request_id", "must be set on GenerateStream (responses are tagged with it)")
            req = self._service.admissible(request)
            req.trace = self._begin_trace(req, request)
            self._service.enqueue(req, self)
        except ServiceError as err:
            self._reject(request.request_id, err)
            return
        except Exception as exc:  # noqa: BLE001 - one request's failure is not the stream's
            self._reject(request.request_id, internal_error("GenerateStream", exc))
            return
        self._live[req.request_id] = _Live(req, request.include_load)

    def _begin_trace(self, req: Request, request: engine_pb2.GenerateRequest):
        """The request's trace, a child of the caller's span when the request carries its context."""
        if not request.trace_context:
            return self._hooks.begin(req.request_id, len(req.prompt_token_ids), request.sampling)
        from opentelemetry import context, propagate  # only traced requests pay for the lookup
        token = context.attach(propagate.extract(dict(request.trace_context)))
        try:
            return self._hooks.begin(req.request_id, len(req.prompt_token_ids), request.sampling)
        finally:
            context.detach(token)

    def _reject(self, request_id: str, err: ServiceError) -> None:
        # the code, message and details Generate would have ended with
        self._rejections.append(engine_pb2.RequestRejection(request_id=request_id, code=err.code.value[0],
                                                            message=err.message, details=err.packed_details()))
        self._wake.set()

    def _cancel(self, request_id: str) -> None:
        live = self._live.get(request_id)
        if live is not None:  # else finished (its last response may be on the way) or never admitted
            self._abort(live)

    def _abort(self, live: _Live) -> None:
        """The client gave the request up: the engine frees its blocks at the next step."""
        if live.req.trace is not None:
            live.req.trace.client_cancelled()
        self._service.engine.abort(live.req.request_id)

    def _message(self) -> engine_pb2.GenerateStreamResponse:
        message = engine_pb2.GenerateStreamResponse()
        report = None
        for request_id, outputs in self._queued.items():
            live = self._live[request_id]  # outputs come only for requests admitted here, until finished
            response = message.responses.add()
            self._service.fill_response(response, outputs)
            finished = outputs[-1].finished
            if live.include_load and (live.first or finished):
                if report is None:
                    report = self._service.load_report()
                response.load.CopyFrom(report)
            live.first = False
            if live.req.trace is not None:
                live.req.trace.output(len(response.tokens))
            if finished:
                del self._live[request_id]
        self._queued = {}
        if self._rejections:
            message.rejections.extend(self._rejections)
            self._rejections = []
        return message

    def _abort_live(self) -> None:
        """The call ended with requests live: abort each (blocks freed at the next step)."""
        if self._live:
            log.info("GenerateStream ended with %d live request(s): aborting them", len(self._live))
        for live in self._live.values():
            self._abort(live)
        self._live.clear()
