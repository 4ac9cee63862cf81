"""A real OTLP/gRPC trace receiver for tests and benchmarks: the collector's TraceService, built
from opentelemetry-proto, keeping every span it is sent.

    with OtlpReceiver() as receiver:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
        ... run services with env ...
        spans = receiver.wait_for(lambda spans: any(s.name == "x" for s in spans))

It runs a synchronous grpc server on its own threads, so sync and asyncio tests can both use it.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

KIND_NAMES = {value: name.removeprefix("SPAN_KIND_") for name, value in trace_pb2.Span.SpanKind.items()}


@dataclass
class Event:
    name: str
    attributes: dict
    time_ns: int


@dataclass
class ReceivedSpan:
    """One exported span, decoded: ids in lower-case hex, `kind` as "SERVER", "CLIENT", ..."""

    service: str
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root span
    start_ns: int
    end_ns: int
    attributes: dict
    events: list[Event] = field(default_factory=list)
    links: list[tuple[str, str]] = field(default_factory=list)  # (trace_id, span_id)
    status_code: int = 0  # 0 unset, 1 ok, 2 error
    status_message: str = ""

    def events_named(self, name: str) -> list[Event]:
        return [e for e in self.events if e.name == name]


def any_value(value) -> object:
    """Decode an OTLP AnyValue into the Python value it carries (arrays become tuples)."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return tuple(any_value(v) for v in value.array_value.values)
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind)


def _attributes(key_values) -> dict:
    return {kv.key: any_value(kv.value) for kv in key_values}


def decode(request: trace_service_pb2.ExportTraceServiceRequest) -> list[ReceivedSpan]:
    out = []
    for resource_spans in request.resource_spans:
        service = _attributes(resource_spans.resource.attributes).get("service.name", "")
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                out.append(ReceivedSpan(
                    service=service, name=span.name, kind=KIND_NAMES[span.kind],
                    trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                    parent_span_id=span.parent_span_id.hex(),
                    start_ns=span.start_time_unix_nano, end_ns=span.end_time_unix_nano,
                    attributes=_attributes(span.attributes),
                    events=[Event(e.name, _attributes(e.attributes), e.time_unix_nano) for e in span.events],
                    links=[(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
                    status_code=span.status.code, status_message=span.status.message))
    return out


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: "OtlpReceiver"):
        self._receiver = receiver

    def Export(self, request, context):
        self._receiver._add(decode(request))
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """An OTLP/gRPC TraceService on 127.0.0.1 (a free port), collecting spans in memory."""

    def __init__(self, host: str = "127.0.0.1"):
        self._cond = threading.Condition()
        self._spans: list[ReceivedSpan] = []
        self.num_exports = 0
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                                   options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), self._server)
        self.port = self._server.add_insecure_port(f"{host}:0")
        self.endpoint = f"http://{host}:{self.port}"  # the http scheme tells the exporter: no TLS

    def __enter__(self) -> "OtlpReceiver":
        self._server.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.stop(grace=None)

    def env(self, schedule_delay_ms: int = 100) -> dict[str, str]:
        """Environment for a service process that should export here, quickly."""
        return {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint,
                "OTEL_BSP_SCHEDULE_DELAY": str(schedule_delay_ms)}

    def _add(self, spans: list[ReceivedSpan]) -> None:
        with self._cond:
            self._spans.extend(spans)
            self.num_exports += 1
            self._cond.notify_all()

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._cond:
            return list(self._spans)

    def clear(self) -> None:
        with self._cond:
            self._spans.clear()

    def wait_for(self, predicate, timeout_s: float = 10.0) -> list[ReceivedSpan]:
        """Block until predicate(spans) is true and return the spans; TimeoutError otherwise, with
        what did arrive (so a failing test says what is missing)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not predicate(self._spans):
                left = deadline - time.monotonic()
                if left <= 0:
                    got = sorted({(s.service, s.name) for s in self._spans})
                    raise TimeoutError(f"spans not received within {timeout_s:.0f}s; received: {got}")
                self._cond.wait(left)
            return list(self._spans)
