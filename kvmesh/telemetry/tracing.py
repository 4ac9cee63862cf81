"""Tracing setup shared by the three services, and W3C trace context in gRPC metadata.

Configuration is the standard `OTEL_*` environment (no kvmesh flags):

- `OTEL_SERVICE_NAME`: default per tier ("kvmesh-router", "kvmesh-tokenizer", "kvmesh-engine");
  `OTEL_RESOURCE_ATTRIBUTES` adds resource attributes.
- `OTEL_TRACES_EXPORTER`: `otlp` (the default once an OTLP endpoint is set), `console`, `none`, or a
  comma-separated list. `none`, `OTEL_SDK_DISABLED=true`, or neither an exporter nor an endpoint set
  turns tracing off: no SDK, and no tracing interceptor on any server or channel, so an RPC costs
  exactly what it costs without OpenTelemetry (spans are the API's no-op ones; trace context is not
  forwarded by a service that does not trace).
- `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
  `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL` (`grpc` by default; `http/protobuf` needs the
  opentelemetry-exporter-otlp-proto-http package), `OTEL_EXPORTER_OTLP_HEADERS`, ...: read by the
  exporter itself.
- `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`, `OTEL_BSP_SCHEDULE_DELAY`, ...: read by the SDK.

Context propagation and the per-RPC spans come from opentelemetry-instrumentation-grpc's grpc.aio
interceptors (`server_interceptors()`, `client_interceptors()`), with health checks, reflection and
the long-lived WatchLoad stream left out. A service's request span is the SERVER span of its RPC:
handlers enrich `trace.get_current_span()` rather than opening a second span.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import logging
import os
import threading

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import (_aio_client, _aio_server, _server, aio_client_interceptors,
                                                aio_server_interceptor, filters)
from opentelemetry.trace import Status, StatusCode

from kvmesh.telemetry import attributes as attrs

log = logging.getLogger(__name__)

EXPORTERS = ("otlp", "console", "none")

# RPCs that get no spans: probes and reflection (noise), and the long-lived streams (one per router
# and engine, living as long as both processes: a span over one would never end): WatchLoad, and
# GenerateStream, whose requests carry their own trace context (GenerateRequest.trace_context).
_UNTRACED = filters.any_of(
    filters.service_name("grpc.health.v1.Health"),
    filters.service_prefix("grpc.reflection."),
    filters.method_name("WatchLoad"),
    filters.method_name("GenerateStream"),
)
_TRACED = filters.negate(_UNTRACED)

# Status codes that are the server's fault (OpenTelemetry gRPC conventions): only these mark a SERVER
# span as failed; the others are the caller's doing and only set error.type.
_SERVER_FAULTS = frozenset({
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
})

_lock = threading.Lock()
_provider = None  # the SDK TracerProvider this process installed, if any


def setup_tracing(default_service_name: str):
    """Install the SDK tracer provider described by the `OTEL_*` environment. Idempotent.

    Args:
        default_service_name: `service.name` when `OTEL_SERVICE_NAME` is not set.
    Returns:
        The SDK TracerProvider, or None when tracing is off (`none` exporter or `OTEL_SDK_DISABLED`).
    Raises:
        ValueError naming the variable and the accepted values when the configuration is invalid.
    """
    global _provider
    with _lock:
        if _provider is not None:
            return _provider
        names = _exporter_names()
        if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" or names == ["none"]:
            return None
        if "OTEL_TRACES_EXPORTER" not in os.environ and not _otlp_endpoint_set():
            log.info("tracing off: neither OTEL_TRACES_EXPORTER nor an OTLP endpoint is set")
            return None
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider

        service_name = os.environ.get("OTEL_SERVICE_NAME") or default_service_name
        # The sampler comes from OTEL_TRACES_SAMPLER (parentbased_always_on by default).
        provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}),
                                  shutdown_on_exit=False)  # bounded shutdown below instead
        for name in names:
            provider.add_span_processor(_span_processor(name))
        trace.set_tracer_provider(provider)
        _provider = provider
        atexit.register(shutdown_tracing)
        log.info("tracing: service %s, exporters %s", service_name, ",".join(names))
        return provider


def shutdown_tracing(timeout_s: float = 3.0) -> None:
    """Export what is buffered and stop, waiting at most timeout_s (an absent collector must not
    hold up a draining service: the SDK itself would retry for up to 30 s)."""
    provider = _provider
    if provider is None:
        return
    worker = threading.Thread(target=provider.shutdown, name="otel-shutdown", daemon=True)
    worker.start()
    worker.join(timeout_s)


def tracing_enabled() -> bool:
    """True when this process records spans: an SDK tracer provider is installed (by
    setup_tracing, or by a test)."""
    from opentelemetry.sdk.trace import TracerProvider

    return isinstance(trace.get_tracer_provider(), TracerProvider)


def _otlp_endpoint_set() -> bool:
    return any(os.environ.get(name, "").strip() for name in
               ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def _exporter_names() -> list[str]:
    raw = os.environ.get("OTEL_TRACES_EXPORTER", "otlp")
    names = [part.strip().lower() for part in raw.split(",") if part.strip()] or ["otlp"]
    for name in names:
        if name not in EXPORTERS:
            raise ValueError(f"OTEL_TRACES_EXPORTER={raw!r}: {name!r} is not one of {', '.join(EXPORTERS)}")
    if "none" in names and len(names) > 1:
        raise ValueError(f"OTEL_TRACES_EXPORTER={raw!r}: 'none' cannot be combined with other exporters")
    return names


def _span_processor(name: str):
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

    if name == "console":  # local use: print each span as it ends
        return SimpleSpanProcessor(ConsoleSpanExporter())
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc").strip()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    elif protocol == "http/protobuf":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise ValueError("OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf needs the "
                             "opentelemetry-exporter-otlp-proto-http package; install it or use grpc") from exc
    else:
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: use grpc or http/protobuf")
    return BatchSpanProcessor(OTLPSpanExporter())


class _ServerInterceptor(_aio_server.OpenTelemetryAioServerInterceptor):
    """The library's server interceptor, with response streams that never hold an attached context
    across a `yield`.

    The library wraps a response stream in `with attach(...)` / `with start_as_current_span(...)`
    over the whole stream. When grpc stops iterating (a client cancel, a deadline, the drain), the
    generator is closed later from another task, or by the garbage collector's finalizer, whose
    contextvars Context is not the one the token was made in: every such stream logged "Failed to
    detach context" with a traceback, tracing on or off (the no-op span is attached too). Here the
    SERVER span's context is attached around each step of the handler and detached before the step
    returns, so attach and detach always run in one task; closing the handler's generator happens
    under its own attach/detach pair, before the span ends (where the engine records an abort).
    """

    def __init__(self, tracer, filter_=None):
        super().__init__(tracer, filter_=filter_)
        # The library's span start (its attributes from the call), with spans left open on exit.
        self._span_starter = _server.OpenTelemetryServerInterceptor(_OpenSpanTracer(tracer))

    def _intercept_aio_server_stream(self, behavior, handler_call_details):
        async def _stream_interceptor(request_or_iterator, context):
            span_context = self._server_span_context(handler_call_details, context)
            span = trace.get_current_span(span_context)
            responses = behavior(request_or_iterator,
                                 _aio_server._OpenTelemetryAioServicerContext(context, span))
            try:
                while True:
                    token = otel_context.attach(span_context)
                    try:
                        response = await responses.__anext__()
                    except StopAsyncIteration:
                        break
                    finally:
                        otel_context.detach(token)
                    yield response
            except Exception as error:
                if type(error) is not Exception:  # bare Exceptions are aborts, recorded already
                    span.record_exception(error)
                raise
            finally:
                token = otel_context.attach(span_context)
                try:
                    await responses.aclose()
                finally:
                    otel_context.detach(token)
                    span.end()

        return _stream_interceptor

    def _server_span_context(self, handler_call_details, context) -> otel_context.Context:
        """A context holding a new SERVER span, child of the caller's trace (from the metadata).

        The library's span start makes the span current; it runs here inside a throwaway copy of
        the contextvars Context, so nothing stays attached, and the span stays open.
        """
        starter = self._span_starter

        def start() -> otel_context.Context:
            with starter._set_remote_context(context):
                with starter._start_span(handler_call_details, context) as span:
                    return trace.set_span_in_context(span)
        return contextvars.copy_context().run(start)


class _OpenSpanTracer:
    """A tracer whose start_as_current_span leaves the span open when its `with` block exits."""

    def __init__(self, tracer):
        self._tracer = tracer

    def start_as_current_span(self, **kwargs):
        return self._tracer.start_as_current_span(**kwargs, end_on_exit=False)


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """Interceptors for `start_server(interceptors=...)`: extract the caller's trace context from
    the metadata and run each RPC inside a SERVER span. None when this process does not trace
    (decided when the server is built: set tracing up first)."""
    if not tracing_enabled():
        return []
    tracer = aio_server_interceptor()._tracer
    return [_ServerInterceptor(tracer, filter_=_TRACED)]


class _EndWithRpc:
    """End a streaming call's CLIENT span when the RPC ends.

    The library ends it when the caller's iteration over the responses ends, but a grpc.aio caller
    that drives a stream with write()/read() (the router's DetokenizeStream) never reads the EOF,
    and one that cancels the call stops iterating: the span would stay open until the call object is
    garbage-collected. The RPC's done callback ends it on time; the library's own end is skipped
    then (ending a span twice logs a warning).
    """

    async def _wrap_stream_response(self, span, call):
        call.add_done_callback(lambda done: asyncio.ensure_future(_end_with_status(span, done)))
        try:
            async for response in call:
                if self._response_hook:
                    self._call_response_hook(span, response)
                yield response
        except Exception as exc:
            if span.is_recording():
                self.add_error_details_to_span(span, exc)
            raise
        except asyncio.CancelledError:  # the caller's task was cancelled while it read
            if span.is_recording():
                _set_status(span, grpc.StatusCode.CANCELLED, "the calling task was cancelled")
            raise
        finally:
            if span.is_recording():
                span.end()


async def _end_with_status(span, call) -> None:
    code, details = await call.code(), await call.details()  # the call is done: these return at once
    if span.is_recording():
        _set_status(span, code, details)
        span.end()


def _set_status(span, code: grpc.StatusCode, details: str) -> None:
    span.set_attribute(attrs.RPC_GRPC_STATUS_CODE, code.value[0])
    if code != grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details}"))


class _UnaryStreamClientInterceptor(_EndWithRpc, _aio_client.UnaryStreamAioClientInterceptor):
    pass


class _StreamStreamClientInterceptor(_EndWithRpc, _aio_client.StreamStreamAioClientInterceptor):
    pass


def client_interceptors() -> list:
    """Interceptors for `create_channel(interceptors=...)`: a CLIENT span per call, its context
    injected into the metadata as W3C `traceparent` (unary and streaming calls alike). None when
    this process does not trace (decided when the channel is made: set tracing up first)."""
    if not tracing_enabled():
        return []
    unary_unary, _, stream_unary, _ = aio_client_interceptors(filter_=_TRACED)
    tracer = unary_unary._tracer
    return [unary_unary, _UnaryStreamClientInterceptor(tracer, filter_=_TRACED), stream_unary,
            _StreamStreamClientInterceptor(tracer, filter_=_TRACED)]


def record_status(code: grpc.StatusCode, message: str = "") -> None:
    """Record a failed RPC on the current span: `error.type` and the gRPC status code always, and
    ERROR status for codes that are the server's fault. Called where exceptions become statuses."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    span.set_attribute(attrs.ERROR_TYPE, code.name)
    span.set_attribute(attrs.RPC_GRPC_STATUS_CODE, code.value[0])
    if code in _SERVER_FAULTS:
        span.set_status(Status(StatusCode.ERROR, message))


def finish_reason_name(reason: int) -> str:
    """kvmesh.v1.FinishReason value -> its `gen_ai.response.finish_reasons` name."""
    return attrs.FINISH_REASON_NAMES.get(int(reason), "unspecified")


def sampling_attributes(sampling) -> dict:
    """GenAI request attributes of a kvmesh.v1.SamplingParams, only for the fields that are present."""
    out = {}
    for field, key in (("max_tokens", attrs.GEN_AI_REQUEST_MAX_TOKENS),
                       ("temperature", attrs.GEN_AI_REQUEST_TEMPERATURE),
                       ("top_p", attrs.GEN_AI_REQUEST_TOP_P),
                       ("top_k", attrs.GEN_AI_REQUEST_TOP_K),
                       ("seed", attrs.GEN_AI_REQUEST_SEED)):
        if sampling.HasField(field):
            out[key] = getattr(sampling, field)
    return out
