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
from kvmesh.telemetry.metrics import EngineMetrics
from kvmesh.telemetry.tracing import sampling_attributes, tracing_enabled

_EMPTY_CONTEXT = Context()  # step spans are roots of their own traces, never children of a request


class RequestTrace:
    """One engine request's span, captured in the Generate handler (the RPC's SERVER span) and
    carried on the request object so the step thread can add events to it."""

    __slots__ = ("span", "context", "recording", "arrival", "last_token_time", "abort_reason")

    def __init__(self, span: trace.Span):
        self.span = span
        self.context = span.get_span_context()  # what step spans link to
        self.recording = span.is_recording()
        self.arrival = 0.0  # time.monotonic() at admission (TelemetryHooks.register)
        self.last_token_time: float | None = None
        self.abort_reason = "cancelled"  # the handler says why before it aborts the request

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


def _hooks_base():
    # Imported here so that `kvmesh.telemetry` never imports the engine package; only engine
    # processes construct TelemetryHooks.
    from engine_svc.core.hooks import EngineHooks

    return EngineHooks


class TelemetryHooks(_hooks_base()):
    """EngineHooks that put request events on each request's span, give each step a span linked to
    the requests it served, and keep the engine's Prometheus metrics.

    The Generate handler calls `register()` with the request's RequestTrace before adding the
    request to the core, `output()` for each output it receives (inter-token latency and generated
    tokens, measured where clients see them), and may set `RequestTrace.abort_reason` before it
    aborts a request. Everything else runs on the engine loop thread, called by EngineCore.
    """

    def __init__(self, model_name: str, engine_id: str = ""):
        self.traces: dict[str, RequestTrace] = {}  # live requests; dict ops are atomic under the GIL
        self._ended: dict[str, RequestTrace] = {}  # finished during the current step: still linked
        self.metrics = EngineMetrics(model_name)
        self.steps = StepTracer(engine_id)
        self._step = 1  # index of the step being run (EngineCore numbers them from 1)

    # --- called by the service (event loop) ---

    def register(self, request_id: str, request_trace: RequestTrace) -> None:
        request_trace.arrival = time.monotonic()
        self.traces[request_id] = request_trace

    def output(self, request_trace: RequestTrace, num_new_tokens: int) -> None:
        """A RequestOutput with num_new_tokens tokens reached the handler."""
        if num_new_tokens <= 0:
            return
        now = time.monotonic()
        self.metrics.generation_tokens.inc(num_new_tokens)
        last = request_trace.last_token_time
        if last is not None:
            gap = (now - last) / num_new_tokens
            for _ in range(num_new_tokens):
                self.metrics.itl.observe(gap)
        request_trace.last_token_time = now

    def update_load(self, snapshot) -> None:
        """The load after a step (an EngineCore.LoadSnapshot or a LoadReport): the gauges."""
        self.metrics.update_load(snapshot)

    # --- EngineHooks (engine loop thread) ---

    def on_queued(self, req) -> None:
        t = self.traces.get(req.request_id)
        if t is not None:
            t.queued()

    def on_scheduled(self, req) -> None:
        t = self.traces.get(req.request_id)
        if t is not None:
            t.scheduled(self._step)

    def on_prefill_chunk(self, req, start: int, num_tokens: int) -> None:
        t = self.traces.get(req.request_id)
        if t is not None:
            t.prefill_chunk(self._step, start, num_tokens)

    def on_first_token(self, req) -> None:
        t = self.traces.get(req.request_id)
        if t is not None:
            t.first_token(self._step)
            self.metrics.ttft.observe(time.monotonic() - t.arrival)

    def on_preempted(self, req) -> None:
        self.metrics.preemptions.inc()
        t = self.traces.get(req.request_id)
        if t is not None:
            t.preempted(self._step)

    def on_finished(self, req) -> None:
        t = self.traces.pop(req.request_id, None)
        if t is not None:
            self._ended[req.request_id] = t
        e2e = time.monotonic() - t.arrival if t is not None else 0.0
        reason = req.finish_reason.value  # "stop_token", "length", "cancelled", "error"
        if reason == "cancelled":
            abort_reason = t.abort_reason if t is not None else "cancelled"
            self.metrics.aborted(abort_reason, req.num_prompt_tokens, e2e)
            if t is not None:
                t.aborted(abort_reason, req.num_output_tokens)
        else:
            self.metrics.finished(reason, req.num_prompt_tokens, e2e)
            if t is not None:
                if reason == "error" and req.error_kind is not None:
                    t.span.set_attribute(attrs.ERROR_TYPE, req.error_kind.value)
                t.finished(reason, req.num_output_tokens)

    def on_step(self, info) -> None:
        self._step = info.step + 1
        ended, self._ended = self._ended, {}
        if not self.steps.enabled:
            return
        end = time.time_ns()
        traces = self.traces
        contexts = []
        for rid in info.request_ids:
            t = traces.get(rid) or ended.get(rid)
            if t is not None:
                contexts.append(t.context)
        num_decode = info.num_decode_seqs
        self.steps.record(info.step, end - int(info.duration_s * 1e9), end, contexts,
                          info.num_batched_tokens - num_decode, num_decode)
