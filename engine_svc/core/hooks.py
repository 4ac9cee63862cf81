"""Hook points for tracing and metrics: the engine core calls these, they do nothing by default.

All methods run on the engine loop thread, inside the step loop: keep them cheap (no I/O, no
string formatting; record and hand off). Subclass EngineHooks and pass it to EngineCore to attach
OpenTelemetry spans or Prometheus metrics without touching the scheduling code.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine_svc.core.request import Request


@dataclass(slots=True)
class StepInfo:
    """What one engine step did. Built by EngineCore.step(), read by hooks (step span, metrics)."""

    step: int  # step number since start
    start_time: float  # time.monotonic() when scheduling began
    duration_s: float  # schedule + model execution + output processing
    num_seqs: int  # sequences in the batch
    num_batched_tokens: int  # tokens computed (prefill chunks + decodes)
    num_decode_seqs: int  # sequences that computed exactly their last sampled token
    num_preempted: int  # requests preempted this step
    num_finished: int  # requests that finished this step
    request_ids: list[str]  # the requests the step served (span links)


class EngineHooks:
    """No-op hooks; override what you need."""

    def begin(self, request_id: str, num_prompt_tokens: int, sampling=None):
        """Called by the Generate handler (event loop) before the request is added: the object to
        store as `req.trace` (read by the other hooks), or None for an untraced request."""
        return None

    def on_queued(self, req: Request) -> None:
        """A request entered the waiting queue (new)."""

    def on_scheduled(self, req: Request) -> None:
        """A request was admitted to the running batch (first time, or resumed after preemption)."""

    def on_prefill_chunk(self, req: Request, start: int, num_tokens: int) -> None:
        """A prefill chunk [start, start + num_tokens) was computed for the request."""

    def on_first_token(self, req: Request) -> None:
        """The request's first generated token was sampled."""

    def on_preempted(self, req: Request) -> None:
        """The request lost its KV blocks and went back to the waiting queue (recompute)."""

    def on_finished(self, req: Request) -> None:
        """The request ended (req.finish_reason says why; blocks already freed)."""

    def on_step(self, info: StepInfo) -> None:
        """A step finished."""
