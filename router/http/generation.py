"""One OpenAI request run through the router's orchestrator: the ASGI response that does it.

The endpoint parses and converts the body, then returns a GenerationResponse; Starlette awaits it in
the request's task. In there, in order:

- the HTTP SERVER span opens, continuing the caller's W3C trace context (traceparent header), so
  the tokenizer and engine spans below are its children as they are of a gRPC Generate's span;
- the orchestrator runs in a child task (it inherits the span) while this task watches for the
  client's `http.disconnect`: a client that goes away cancels the child, and the orchestrator's
  `finally` cancels the engine call (the engine aborts and frees the request's blocks);
- an error before the first response is answered as an OpenAI error with its HTTP status; after it,
  a streaming response ends with an `error` event and `[DONE]`, a non-streaming one gets the error
  status instead of a body.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.responses import Response

from kvmesh.serving.errors import ServiceError
from kvmesh.telemetry import attributes as attrs
from kvmesh.telemetry.router import RouterRequestTrace
from kvmesh.v1 import common_pb2, router_pb2
from router.http import sse
from router.http.errors import OpenAIError, from_service_error, from_stream_error
from router.orchestrator import Orchestrator

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("kvmesh.router.http")


class Renderer:
    """Turns router responses into one OpenAI endpoint's JSON (see completions.py and chat.py)."""

    # Router field path -> the name this request used, where it differs from errors.openai_param's.
    param_names: dict[str, str] = {}

    async def chunks(self, out: router_pb2.RouterGenerateResponse) -> list[dict]:
        """Streaming: the chunks for one router response (none when it carries nothing to show)."""
        raise NotImplementedError

    async def body(self, outs: list[router_pb2.RouterGenerateResponse]) -> dict:
        """Non-streaming: the whole response from every router response."""
        raise NotImplementedError

    def usage_chunk(self, last: router_pb2.RouterGenerateResponse) -> dict:
        """stream_options.include_usage: the chunk before [DONE], usage and no choices."""
        raise NotImplementedError


async def traced_generate(orchestrator: Orchestrator, model: str, req: router_pb2.RouterGenerateRequest,
                          ) -> AsyncIterator[router_pb2.RouterGenerateResponse]:
    """The orchestrator's stream with the router's GenAI span attributes and metrics, as the gRPC
    servicer records them."""
    with RouterRequestTrace(req, model) as rec:
        # Closed here when this generator is closed (client gone), not later by the garbage collector.
        async with contextlib.aclosing(orchestrator.generate(req, None)) as responses:
            async for out in responses:
                rec.response(out)
                yield out


async def _disconnected(receive) -> None:
    """Returns when the client has gone (the body was read by the endpoint already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class GenerationResponse(Response):
    """An ASGI response running one router request. `stream` selects SSE or one JSON body.

    A Response subclass only so that FastAPI hands it to the server as it is."""

    def __init__(self, orchestrator: Orchestrator, model: str, req: router_pb2.RouterGenerateRequest,
                 renderer: Renderer, *, stream: bool, include_usage: bool, user: str | None):
        super().__init__()
        self._orchestrator, self._model, self._req = orchestrator, model, req
        self._renderer = renderer
        self._stream, self._include_usage, self._user = stream, include_usage, user
        self._status = 200
        self._started = False  # response headers sent

    async def __call__(self, scope, receive, send) -> None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())}
        name = f"{scope['method']} {scope['path']}"
        span_attrs = {attrs.HTTP_REQUEST_METHOD: scope["method"], attrs.HTTP_ROUTE: scope["path"]}
        if self._user:
            span_attrs[attrs.ENDUSER_ID] = self._user
        with _tracer.start_as_current_span(name, context=propagate.extract(headers), kind=SpanKind.SERVER,
                                           attributes=span_attrs) as span:
            work = asyncio.ensure_future(self._respond(send))
            gone = asyncio.ensure_future(_disconnected(receive))
            try:
                await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
                if not work.done():  # the client left (or the server is stopping): end the request
                    work.cancel()
                await asyncio.gather(work, return_exceptions=True)
            span.set_attribute(attrs.HTTP_RESPONSE_STATUS_CODE, self._status)
            if self._status >= 500:
                span.set_status(Status(StatusCode.ERROR))

    async def _respond(self, send) -> None:
        outs = traced_generate(self._orchestrator, self._model, self._req)
        try:
            try:
                first = await anext(outs)
            except ServiceError as exc:
                await self._send_error(send, from_service_error(exc, self._renderer.param_names))
                return
            if self._stream:
                await self._send_stream(send, first, outs)
            else:
                await self._send_body(send, [first, *[out async for out in outs]])
        except OpenAIError as exc:  # a renderer's refusal (before anything was sent)
            await self._send_error(send, exc)
        except Exception as exc:
            log.error("request %s failed in the HTTP front", self._req.request_id or "-", exc_info=exc)
            err = OpenAIError(500, "internal error in the HTTP front", type="internal_server_error")
            if not self._started:
                await self._send_error(send, err)
            else:  # headers went out with 200: end the event stream with the error
                self._status = err.status
                await sse.event(send, err.body())
                await sse.done(send)
        finally:
            await outs.aclose()  # a cancel while sending left it suspended: run its cleanup now

    async def _send_error(self, send, err: OpenAIError) -> None:
        self._status = err.status
        self._started = True
        await sse.send_json(send, err.status, err.body(), err.headers())

    async def _send_body(self, send, outs: list[router_pb2.RouterGenerateResponse]) -> None:
        last = outs[-1]
        if last.finish_reason == common_pb2.FINISH_REASON_ERROR:
            await self._send_error(send, from_stream_error(last.error.code, last.error.message))
            return
        body = await self._renderer.body(outs)
        self._started = True
        await sse.send_json(send, 200, body)

    async def _send_stream(self, send, first, outs) -> None:
        await sse.start(send)
        self._started = True
        last = first
        async for out in _prepend(first, outs):
            last = out
            if out.finish_reason == common_pb2.FINISH_REASON_ERROR:
                await sse.event(send, from_stream_error(out.error.code, out.error.message).body())
            for chunk in await self._renderer.chunks(out):
                await sse.event(send, chunk)
        if self._include_usage:
            await sse.event(send, self._renderer.usage_chunk(last))
        await sse.done(send)


async def _prepend(first, rest: AsyncIterator) -> AsyncIterator:
    yield first
    async for item in rest:
        yield item
