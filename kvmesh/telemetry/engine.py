"""Engine-side tracing: events on each request's span, and one span per engine step linked to the
request spans it served (TGI `backends/v3/src/backend.rs`: requests and batches are separate spans
joined by links).

The step loop runs in its own thread, where no OpenTelemetry context is current: it reaches a
request's span through the RequestTrace stored on the request, never through context variables.
Nothing here formats strings; a process without tracing pays one attribute test per call.
The engine's hooks that drive these (engine_svc.telemetry_hooks.TelemetryHooks) live beside the engine.
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
    """One engine request's span (a child of the Generate RPC's SERVER span), carried on the request object
    (`Request.trace`) so that the engine thread adds events to it without any context lookup.
    Made by the engine's TelemetryHooks.begin() (engine_svc.telemetry_hooks) in the handler; the event
    methods are called by the hooks."""

    __slots__ = ("span", "context", "metrics", "arrival", "last_token_time", "num_output_tokens", "abort_reason")

    def __init__(self, span: trace.Span, metrics: EngineMetrics | None = None):
        self.span = span
        self.context = span.get_span_context()  # what step spans link to
        self.metrics = metrics
        self.arrival = time.monotonic()
        self.last_token_time: float | None = None
        self.num_output_tokens = 0  # tokens handed to the client so far
        # Why the request is aborted, should it be: "client_cancelled" when the handler's consumer
        # went away (client_cancelled()); otherwise (Abort RPC, shutdown) "cancelled".
        self.abort_reason = "cancelled"

    @property
    def recording(self) -> bool:
        return self.span.is_recording()

    def start(self, request_id: str, model: str, num_prompt_tokens: int, sampling=None,
              engine_id: str = "") -> None:
        """Request attributes, set once on admission; `sampling` is a kvmesh.v1.SamplingParams."""
        if not self.recording:
            return
        span = self.span
        span.set_attributes({attrs.REQUEST_ID: request_id, attrs.GEN_AI_REQUEST_MODEL: model,
                             attrs.GEN_AI_USAGE_INPUT_TOKENS: num_prompt_tokens})
        if engine_id:
            span.set_attribute(attrs.ENGINE_ID, engine_id)
        if sampling is not None:
            span.set_attributes(sampling_attributes(sampling))

    def output(self, num_new_tokens: int) -> None:
        """An output with num_new_tokens tokens reached the handler (on the event loop): generated
        tokens and inter-token latency, measured where clients see them."""
        if num_new_tokens <= 0 or self.metrics is None:
            return
        now = time.monotonic()
        self.num_output_tokens += num_new_tokens
        self.metrics.generation_tokens.inc(num_new_tokens)
        if self.last_token_time is not None:
            gap = (now - self.last_token_time) / num_new_tokens
            for _ in range(num_new_tokens):
                self.metrics.itl.observe(gap)
        else:  # the first output: tokens after the first reached the client with it, 0 s apart
            for _ in range(num_new_tokens - 1):  # (one observation a token after the first, always)
                self.metrics.itl.observe(0.0)
        self.last_token_time = now

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

    def client_cancelled(self) -> None:
        """The handler's consumer went away (client cancel, deadline); call before aborting the
        request: the engine records the abort with this reason at its next step boundary."""
        self.abort_reason = "client_cancelled"

    def aborted(self, num_output_tokens: int) -> None:
        """The engine ended the request unfinished (engine thread): the event, then the span ends."""
        if self.recording:
            self.span.add_event(attrs.EVENT_ABORTED, {attrs.ABORT_REASON: self.abort_reason})
            self.span.set_attributes({attrs.GEN_AI_USAGE_OUTPUT_TOKENS: num_output_tokens,
                                      attrs.GEN_AI_RESPONSE_FINISH_REASONS: ("cancelled",)})
            self.span.end()

    def finished(self, finish_reason: str, num_output_tokens: int) -> None:
        """`finish_reason` is an attributes.FINISH_REASON_NAMES value; the span ends."""
        if self.recording:
            self.span.add_event(attrs.EVENT_FINISHED, {attrs.FINISH_REASON: finish_reason})
            self.span.set_attributes({attrs.GEN_AI_USAGE_OUTPUT_TOKENS: num_output_tokens,
                                      attrs.GEN_AI_RESPONSE_FINISH_REASONS: (finish_reason,)})
            self.span.end()

    def rejected(self) -> None:
        """The request never reached the engine (a live duplicate id): end the span."""
        self.span.end()


class StepTracer:
    """Engine step spans, each linked to the request spans its steps served.

    A step that computes prompt tokens gets a span of its own. Consecutive pure-decode steps over the
    same batch (the long, repetitive stretch of a generation) share one span, whose
    `kvmesh.step.count` says how many steps it covers: a span with 16 links costs about 0.2 ms to
    create and export, as much as a whole decode step of a small model on a CPU, so one per step
    would cost a few percent of throughput. A shared span ends when the batch changes, after
    MAX_RUN_STEPS steps or MAX_RUN_NS, or at flush() (the engine went idle). Step timestamps are epoch
    nanoseconds; `now()` gives them.
    """

    MAX_RUN_STEPS = 64
    MAX_RUN_NS = 1_000_000_000

    __slots__ = ("enabled", "engine_id", "_tracer", "_run")

    now = staticmethod(time.time_ns)

    def __init__(self, engine_id: str = ""):
        self.enabled = tracing_enabled()
        self._tracer = trace.get_tracer("kvmesh.engine")
        self.engine_id = engine_id
        self._run: list | None = None  # the open decode run: [key, contexts, first index, start, end, count, tokens]

    def extends(self, key: tuple, num_prefill_tokens: int, end_ns: int) -> bool:
        """True when a step with this batch (key: its request ids) continues the open decode run."""
        run = self._run
        return (run is not None and num_prefill_tokens == 0 and run[0] == key
                and run[5] < self.MAX_RUN_STEPS and end_ns - run[3] < self.MAX_RUN_NS)

    def extend(self, end_ns: int, num_decode_tokens: int) -> None:
        run = self._run
        run[4] = end_ns
        run[5] += 1
        run[6] += num_decode_tokens

    def record(self, key: tuple, index: int, start_ns: int, end_ns: int, contexts, num_prefill_tokens: int,
               num_decode_tokens: int) -> None:
        """A step that does not extend the open run (see extends()): ends that run, then opens a new
        one (a decode step) or emits its own span (a step with prompt tokens)."""
        self.flush()
        if num_prefill_tokens == 0:
            self._run = [key, contexts, index, start_ns, end_ns, 1, num_decode_tokens]
        else:
            self._emit(contexts, index, start_ns, end_ns, 1, num_prefill_tokens, num_decode_tokens)

    def flush(self) -> None:
        run, self._run = self._run, None
        if run is not None:
            _, contexts, index, start_ns, end_ns, count, num_decode_tokens = run
            self._emit(contexts, index, start_ns, end_ns, count, 0, num_decode_tokens)

    def _emit(self, contexts, index, start_ns, end_ns, count, num_prefill_tokens, num_decode_tokens) -> None:
        span = self._tracer.start_span(
            attrs.STEP_SPAN_NAME, context=_EMPTY_CONTEXT, kind=SpanKind.INTERNAL, start_time=start_ns,
            links=[Link(ctx) for ctx in contexts],
            attributes={attrs.STEP_INDEX: index, attrs.STEP_COUNT: count, attrs.STEP_NUM_REQUESTS: len(contexts),
                        attrs.STEP_NUM_PREFILL_TOKENS: num_prefill_tokens,
                        attrs.STEP_NUM_DECODE_TOKENS: num_decode_tokens, attrs.ENGINE_ID: self.engine_id})
        span.end(end_time=end_ns)
