"""The engine's telemetry hooks: request events on each request's span, a span per engine step (or
decode run) linked to the requests it served, and the engine's Prometheus metrics.

They live beside the engine (the shared kvmesh.telemetry package knows nothing of the engine's hook
points) and are injected: `kvmesh-engine` hands one TelemetryHooks to the engine core and the
service; tests and benchmarks run the core with plain EngineHooks.
"""

from __future__ import annotations

import time

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from kvmesh.telemetry import attributes as attrs
from kvmesh.telemetry.engine import RequestTrace, StepTracer
from kvmesh.telemetry.metrics import EngineMetrics

from engine_svc.core.hooks import EngineHooks


class TelemetryHooks(EngineHooks):
    """EngineHooks that put request events on each request's span, give each step a span linked to
    the requests it served, and keep the engine's Prometheus metrics.

    The Generate handler sets `req.trace = hooks.begin(...)` before it adds the request, calls
    `req.trace.output(n)` for each output it receives, and `req.trace.client_cancelled()` before it
    aborts a request whose consumer went away. Everything else runs on the engine thread, called by EngineCore, and reaches the span
    through `req.trace`. Requests without one (the engine's own warm-up) are neither traced nor
    counted; preemptions are counted whoever suffers them.
    """

    def __init__(self, model_name: str, engine_id: str = ""):
        self.metrics = EngineMetrics(model_name)
        self.steps = StepTracer(engine_id)
        self._tracer = trace.get_tracer("kvmesh.engine")
        self._model_name = model_name
        self._contexts: dict[str, object] = {}  # live request id -> span context (engine thread only)
        self._ended: dict[str, object] = {}  # finished during the current step: still linked by it
        self._step = 1  # index of the step being run (EngineCore numbers them from 1)

    def bind(self, engine_id: str, get_load) -> None:
        """Name the engine (step and request span attribute) and read the queue and block gauges from
        get_load() (the newest LoadSnapshot) at scrape time."""
        self.steps.engine_id = engine_id
        self.metrics.watch_load(get_load)

    def begin(self, request_id: str, num_prompt_tokens: int, sampling=None) -> RequestTrace:
        """The RequestTrace of the request being admitted: a span of its own, a child of the
        handler's (current) RPC span, ended by the engine thread when the request ends. Not the RPC
        span itself: a cancelled RPC's span ends at once, before the abort reaches the engine."""
        span = self._tracer.start_span(attrs.REQUEST_SPAN_NAME, kind=SpanKind.INTERNAL)
        rt = RequestTrace(span, self.metrics)
        rt.start(request_id, self._model_name, num_prompt_tokens, sampling, self.steps.engine_id)
        return rt

    # --- EngineHooks (engine thread) ---

    def on_queued(self, req) -> None:
        t = req.trace
        if t is not None:
            self._contexts[req.request_id] = t.context
            t.queued()

    def on_scheduled(self, req) -> None:
        if req.trace is not None:
            req.trace.scheduled(self._step)

    def on_prefill_chunk(self, req, start: int, num_tokens: int) -> None:
        if req.trace is not None:
            req.trace.prefill_chunk(self._step, start, num_tokens)

    def on_first_token(self, req) -> None:
        t = req.trace
        if t is not None:
            t.first_token(self._step)
            self.metrics.ttft.observe(time.monotonic() - t.arrival)

    def on_preempted(self, req) -> None:
        self.metrics.preemptions.inc()
        if req.trace is not None:
            req.trace.preempted(self._step)

    def on_finished(self, req) -> None:
        t = req.trace
        if t is None:
            return
        if self._contexts.pop(req.request_id, None) is not None:
            self._ended[req.request_id] = t.context
        e2e = time.monotonic() - t.arrival
        reason = req.finish_reason.value  # "stop_token", "length", "cancelled", "error"
        if reason == "cancelled":
            self.metrics.aborted(t.abort_reason, req.num_prompt_tokens, e2e)
            t.aborted(req.num_output_tokens)
            return
        self.metrics.finished(reason, req.num_prompt_tokens, e2e)
        if req.error_kind is not None:
            t.span.set_attribute(attrs.ERROR_TYPE, req.error_kind.value)
        t.finished(reason, req.num_output_tokens)

    def on_step(self, info) -> None:
        self._step = info.step + 1
        ended, self._ended = self._ended, {}
        steps = self.steps
        if not steps.enabled:
            return
        end = time.time_ns()
        key = tuple(info.request_ids)
        num_decode = info.num_decode_seqs
        num_prefill = info.num_batched_tokens - num_decode
        if steps.extends(key, num_prefill, end):
            steps.extend(end, num_decode)
        else:
            contexts, live = [], self._contexts
            for rid in key:
                ctx = live.get(rid) or ended.get(rid)
                if ctx is not None:
                    contexts.append(ctx)
            steps.record(key, info.step, end - int(info.duration_s * 1e9), end, contexts, num_prefill, num_decode)
        if not self._contexts:  # nothing left to run: the engine goes idle, end the open span now
            steps.flush()
