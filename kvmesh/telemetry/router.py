"""Router-side telemetry: the request span with its GenAI attributes, the GenAI server histograms,
and the per-engine pick metrics.

The router's request span is the SERVER span of its Generate RPC (opened by the tracing
interceptor), renamed "{operation} {model}" as the GenAI conventions name spans. RouterRequestTrace
wraps the servicer's response loop:

    with RouterRequestTrace(request, model) as rec:
        async for out in ...:
            rec.response(out)
            yield out
"""

from __future__ import annotations

import asyncio
import time

from opentelemetry import trace

from kvmesh.telemetry import attributes as attrs
from kvmesh.telemetry.metrics import RouterMetrics
from kvmesh.telemetry.tracing import finish_reason_name, sampling_attributes

_ERROR_REASON_NAMES = {1: "internal", 2: "engine_lost", 3: "draining", 4: "deadline_exceeded", 5: "out_of_kv_cache"}


class RouterRequestTrace:
    """One router Generate request: span attributes at the start, usage and finish reason from the
    last response, the abort when the client goes away; the gen_ai_server_* histograms."""

    __slots__ = ("span", "metrics", "_start", "_first", "_num_responses")

    def __init__(self, request, default_model: str):
        """`request` is a kvmesh.v1.RouterGenerateRequest; default_model names the served model when
        the request leaves `model` empty."""
        operation = attrs.OPERATION_CHAT if request.WhichOneof("input") == "chat" else attrs.OPERATION_TEXT_COMPLETION
        model = request.model or default_model
        self.span = trace.get_current_span()
        self.metrics = RouterMetrics(operation, model)
        self._start = time.monotonic()
        self._first: float | None = None
        self._num_responses = 0
        if not self.span.is_recording():
            return
        self.span.update_name(f"{operation} {model}")
        self.span.set_attributes({attrs.GEN_AI_OPERATION_NAME: operation, attrs.GEN_AI_PROVIDER_NAME: attrs.PROVIDER,
                                  attrs.GEN_AI_REQUEST_MODEL: model, **sampling_attributes(request.sampling)})
        if request.stop:
            self.span.set_attribute(attrs.GEN_AI_REQUEST_STOP_SEQUENCES, list(request.stop))
        if request.request_id:
            self.span.set_attribute(attrs.REQUEST_ID, request.request_id)

    def __enter__(self) -> "RouterRequestTrace":
        return self

    def response(self, out) -> None:
        """Record one kvmesh.v1.RouterGenerateResponse on its way to the client."""
        now = time.monotonic()
        self._num_responses += 1
        if self._first is None:
            self._first = now
            self.metrics.first_token(now - self._start)
            if self.span.is_recording():
                self.span.set_attributes({attrs.GEN_AI_RESPONSE_ID: out.request_id, attrs.REQUEST_ID: out.request_id,
                                          attrs.ENGINE_ID: out.engine_id})
        if out.finish_reason == 0:  # FINISH_REASON_UNSPECIFIED: not the last response
            return
        usage = out.usage
        if usage.completion_tokens > 1:
            self.metrics.per_output_token((now - self._first) / (usage.completion_tokens - 1))
        if self.span.is_recording():
            reason = finish_reason_name(out.finish_reason)
            self.span.set_attributes({attrs.GEN_AI_USAGE_INPUT_TOKENS: usage.prompt_tokens,
                                      attrs.GEN_AI_USAGE_OUTPUT_TOKENS: usage.completion_tokens,
                                      attrs.GEN_AI_RESPONSE_FINISH_REASONS: [reason]})
            self.span.add_event(attrs.EVENT_FINISHED, {attrs.FINISH_REASON: reason})
            if out.HasField("error"):
                self.span.set_attribute(attrs.ERROR_TYPE, _ERROR_REASON_NAMES.get(out.error.reason, "error"))

    def __exit__(self, exc_type, exc, tb) -> None:
        error_type = ""
        if exc_type is not None:
            if issubclass(exc_type, (asyncio.CancelledError, GeneratorExit)):
                error_type = "CANCELLED"
                if self.span.is_recording():
                    self.span.add_event(attrs.EVENT_ABORTED, {attrs.ABORT_REASON: "client_cancelled"})
                    self.span.set_attribute(attrs.GEN_AI_RESPONSE_FINISH_REASONS, ["cancelled"])
            else:
                code = getattr(exc, "code", None)  # a ServiceError's status code
                error_type = getattr(code, "name", None) or exc_type.__name__
        self.metrics.request_done(time.monotonic() - self._start, error_type)


def record_pick(decision) -> None:
    """The pick metrics of one router.policy.Decision (a no-op when no engine was chosen)."""
    chosen = decision.chosen_candidate
    if chosen is not None:
        RouterMetrics.picked(chosen.engine_id or chosen.address, chosen.report_age_s)
