"""Engine-side tracing: events on each request's span, and one span per engine step linked to the
request spans it served (TGI `backends/v3/src/backend.rs`: requests and batches are separate spans
joined by links).

The step loop runs in its own thread, where no OpenTelemetry context is current: it reaches a
request's span through the RequestTrace stored on the request, never through context variables.
Nothing here formats strings; a process without tracing pays one attribute test per call.
"""

from __future__ import annotations

import time

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanKind

from kvmesh.telemetry import attributes as attrs
from kvmesh.telemetry.tracing import sampling_attributes, tracing_enabled

_EMPTY_CONTEXT = Context()  # step spans are roots of their own traces, never children of a request


class RequestTrace:
    """One engine request's span, captured in the Generate handler (the RPC's SERVER span) and
    carried on the request object so the step thread can add events to it."""

    __slots__ = ("span", "context", "recording")

    def __init__(self, span: trace.Span):
        self.span = span
        self.context = span.get_span_context()  # what step spans link to
        self.recording = span.is_recording()

    @classmethod
    def current(cls) -> "RequestTrace":
        """The span of the RPC being handled (call from the handler, on the event loop)."""
        return cls(trace.get_current_span())

    def start(self, request_id: str, model: str, num_prompt_tokens: int, sampling=None,
              engine_id: str = "") -> None:
        """Request attributes, set once on admission; `sampling` is a kvmesh.v1.SamplingParams."""
        if not self.recording:
            return
        span = self.span
        span.set_attribute(attrs.REQUEST_ID, request_id)
        span.set_attribute(attrs.GEN_AI_REQUEST_MODEL, model)
        span.set_attribute(attrs.GEN_AI_USAGE_INPUT_TOKENS, num_prompt_tokens)
        if engine_id:
            span.set_attribute(attrs.ENGINE_ID, engine_id)
        if sampling is not None:
            span.set_attributes(sampling_attributes(sampling))

    def queued(self) -> None:
        if self.recording:
            self.span.add_event(attrs.EVENT_QUEUED)

    def scheduled(self, step: int) -> None:
        if self.recording:
            self.span.add_event(attrs.EVENT_SCHEDULED, {attrs.STEP_INDEX: step})

    def prefill_chunk(self, step: int, start: int, num_tokens: int) -> None:
        if self.recording:
            self.span.add_event(attrs.EVENT_PREFILL_CHUNK,
                                {attrs.STEP_INDEX: step, attrs.CHUNK_START: start, attrs.CHUNK_TOKENS: num_tokens})

    def first_token(self, step: int) -> None:
        if self.recording:
            self.span.add_event(attrs.EVENT_FIRST_TOKEN, {attrs.STEP_INDEX: step})

    def preempted(self, step: int) -> None:
        if self.recording:
            self.span.add_event(attrs.EVENT_PREEMPTED, {attrs.STEP_INDEX: step})

    def aborted(self, reason: str, num_output_tokens: int) -> None:
        """The request ended before finishing: `reason` is "cancelled", "deadline_exceeded",
        "abort_rpc", "draining", ..."""
        if self.recording:
            self.span.add_event(attrs.EVENT_ABORTED, {attrs.ABORT_REASON: reason})
            self.span.set_attribute(attrs.GEN_AI_USAGE_OUTPUT_TOKENS, num_output_tokens)
            self.span.set_attribute(attrs.GEN_AI_RESPONSE_FINISH_REASONS, ("cancelled",))

    def finished(self, finish_reason: str, num_output_tokens: int) -> None:
        """`finish_reason` is an attributes.FINISH_REASON_NAMES value."""
        if self.recording:
            self.span.add_event(attrs.EVENT_FINISHED, {attrs.FINISH_REASON: finish_reason})
            self.span.set_attribute(attrs.GEN_AI_USAGE_OUTPUT_TOKENS, num_output_tokens)
            self.span.set_attribute(attrs.GEN_AI_RESPONSE_FINISH_REASONS, (finish_reason,))


class StepTracer:
    """One span per engine step, linked to the request spans of the step's batch.

    Usage in the step loop (timestamps from `now()`, epoch nanoseconds):
        t0 = steps.now(); ...run the step...; steps.record(index, t0, steps.now(), contexts, ...)
    where `contexts` are the RequestTrace.context values of the step's requests.
    """

    __slots__ = ("enabled", "_tracer", "_engine_id")

    now = staticmethod(time.time_ns)

    def __init__(self, engine_id: str = ""):
        self.enabled = tracing_enabled()
        self._tracer = trace.get_tracer("kvmesh.engine")
        self._engine_id = engine_id

    def record(self, index: int, start_ns: int, end_ns: int, contexts, num_prefill_tokens: int,
               num_decode_tokens: int) -> None:
        if not self.enabled:
            return
        span = self._tracer.start_span(
            attrs.STEP_SPAN_NAME, context=_EMPTY_CONTEXT, kind=SpanKind.INTERNAL, start_time=start_ns,
            links=[Link(ctx) for ctx in contexts],
            attributes={attrs.STEP_INDEX: index, attrs.STEP_NUM_REQUESTS: len(contexts),
                        attrs.STEP_NUM_PREFILL_TOKENS: num_prefill_tokens,
                        attrs.STEP_NUM_DECODE_TOKENS: num_decode_tokens,
                        attrs.ENGINE_ID: self._engine_id})
        span.end(end_time=end_ns)
