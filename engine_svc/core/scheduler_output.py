"""What one schedule() decides, and the token budget it fills. Imports no torch.

Built by the Scheduler (engine_svc/core/scheduler.py), read by the engine core; the step itself is
the StepPlan of engine_svc/step.py, the rest says which requests it advances and what happened to
the queues on the way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine_svc.core.request import Request
from engine_svc.step import ScheduledSeq, StepPlan


@dataclass(slots=True)
class SchedulerOutput:
    """One step's decisions. Built by Scheduler.schedule(); read by the engine core.

    The step itself is ``plan`` (engine_svc/step.py StepPlan): new requests in full, running ones as
    differences, for the model runner's persistent batch. ``seqs`` gives the same step in full
    (ScheduledSeq per request), built on first access, for tests and simple runners.
    """

    # The model runner's input, in batch order: running requests first (decodes, then prefill chunks),
    # then newly admitted ones. plan.removed_ids is filled by the engine core.
    plan: StepPlan = field(default_factory=StepPlan)
    # Aligned with plan.req_ids: the requests the engine core advances with the step's results, and
    # each one's num_computed_tokens when it was scheduled (the position of its first new token).
    requests: list[Request] = field(default_factory=list)
    start_pos: list[int] = field(default_factory=list)
    # Sum of plan.num_new_tokens; never above max_num_batched_tokens.
    num_batched_tokens: int = 0
    # Requests admitted from the waiting queue this step (new, or resumed after a preemption).
    # Tracing/metrics: the "scheduled" event, queue time.
    admitted: list[Request] = field(default_factory=list)
    # Requests preempted this step, newest first: blocks freed, requeued at the front of waiting.
    # Tracing/metrics: the "preempted" event and counter.
    preempted: list[Request] = field(default_factory=list)
    # Requests that can never fit in the KV cache, even alone: the engine core finishes them with
    # FinishReason.ERROR. The scheduler already removed them from its queues.
    failed: list[Request] = field(default_factory=list)
    _seqs: list[ScheduledSeq] | None = None

    @property
    def seqs(self) -> list[ScheduledSeq]:
        """The step in full; block_ids are live tables, valid until the next schedule(). Build it
        before the engine core advances the requests (new_token_ids are read from them)."""
        if self._seqs is None:
            self._seqs = [ScheduledSeq(
                request_id=req.request_id, new_token_ids=req.token_ids(start, start + n), start_pos=start,
                block_ids=self._block_table(req.request_id), sample=sample, params=req.params,
                prompt_token_ids=req.prompt_token_ids, output_token_ids=req.output_token_ids)
                for req, start, n, sample in zip(self.requests, self.start_pos, self.plan.num_new_tokens,
                                                 self.plan.sample)]
        return self._seqs

    _block_table: object = None  # BlockManager.block_table, set by the scheduler


@dataclass(slots=True)
class Budget:
    """What is left of a step's budget while schedule() fills it."""

    tokens: int
    seqs: int
