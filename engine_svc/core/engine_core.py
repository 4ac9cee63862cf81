"""The synchronous engine core: requests in, one step at a time, outputs out. Imports no torch.

EngineCore owns every request's state, the scheduler and the block manager, and drives a model
runner: ``launch(StepPlan) -> pending`` with ``pending.result() -> list[SampledToken | None]``
(engine_svc/model_runner.py), or anything with ``execute(list[ScheduledSeq])`` (tests, fakes). It
is not thread-safe by design: exactly one thread (the engine loop, engine_svc/engine_loop.py) calls
it. Benchmarks and tests may drive it directly.

Async scheduling (overlap): with ``async_scheduling`` each step() schedules and launches step N+1
*before* it collects step N, so the CPU plans the next step while the GPU runs the current one. A
token step N samples is a placeholder for the scheduler (Request.num_output_placeholders) until it
is collected; step N+1 takes it from the device. Stop tokens therefore apply one step late: a
request that stops at step N already has a token in step N+1, which is discarded (its KV write lands
in the request's own blocks, freed by then; the stream orders it before any later reuse).
Max_tokens and max_model_len are known ahead, so no step is scheduled past them.

Stop conditions, checked after each sampled token, in this order:
  1. the token is one of the request's stop_token_ids, or a model EOS id (unless ignore_eos), and
     at least min_tokens tokens were generated before it      -> STOP_TOKEN (the token is included)
  2. max_tokens tokens were generated                          -> LENGTH
  3. the sequence reached max_model_len                        -> LENGTH
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from kvmesh.load import LoadSnapshot

from engine_svc.core.block_manager import BlockManager
from engine_svc.core.hooks import EngineHooks, StepInfo
from engine_svc.core.request import ErrorKind, FinishReason, Request, RequestOutput, RequestStatus
from engine_svc.core.scheduler import Scheduler, SchedulerOutput
from engine_svc.step import SampledToken, ScheduledSeq


class Runner(Protocol):
    def execute(self, seqs: list[ScheduledSeq]) -> list[SampledToken | None]: ...


@dataclass(slots=True)
class _Launched:
    """A step on its way: what was scheduled and the runner's handle to its results."""

    sched: SchedulerOutput
    handle: object  # .result() -> list[SampledToken | None], aligned with sched.requests
    start_time: float


class _Done:
    """The handle of a step a synchronous runner (execute) already ran."""

    def __init__(self, results: list[SampledToken | None]):
        self._results = results

    def result(self) -> list[SampledToken | None]:
        return self._results


class EngineCore:
    """Requests, scheduler, block manager and the step that ties them to the model runner.

    Args:
        runner: executes scheduled sequences (engine_svc.model_runner.ModelRunner, or any Runner).
        num_blocks, block_size: the KV cache geometry the runner allocated.
        eos_token_ids: the model's EOS ids (ModelInfo.eos_token_ids).
        max_model_len: the longest sequence; requests are cut there with LENGTH.
        max_num_batched_tokens, max_num_seqs, enable_chunked_prefill: scheduling limits.
        enable_prefix_caching: reuse the KV of cached prompt prefixes (engine_svc/core/prefix_cache.py).
        hooks: tracing/metrics hook points (no-ops by default).
        async_scheduling: overlap scheduling with the previous step (needs a runner with launch()).
    """

    def __init__(self, runner: Runner, *, num_blocks: int, block_size: int, eos_token_ids: list[int],
                 max_model_len: int, max_num_batched_tokens: int, max_num_seqs: int,
                 enable_chunked_prefill: bool = True, hooks: EngineHooks | None = None,
                 enable_prefix_caching: bool = False, async_scheduling: bool = False):
        self.runner = runner
        self._launches = hasattr(runner, "launch")
        self.async_scheduling = async_scheduling and self._launches
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_batched_tokens, max_num_seqs,
                                   enable_chunked_prefill)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self.hooks = hooks or EngineHooks()
        self.requests: dict[str, Request] = {}  # live requests (waiting or running)
        self.num_steps = 0
        self._load_version = 0
        self._inflight: _Launched | None = None  # async scheduling: launched, not yet collected
        self._removed: list[str] = []  # ids whose runner rows go with the next launch

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or self._inflight is not None

    # ---- commands ----

    def add(self, req: Request) -> None:
        """Queue a validated request. Its id must not be live (the service checks before sending)."""
        assert req.request_id not in self.requests, f"duplicate live request id {req.request_id!r}"
        req.max_model_len = self.max_model_len
        self.requests[req.request_id] = req
        self.scheduler.add(req)
        self.hooks.on_queued(req)

    def abort(self, request_id: str, reason: FinishReason = FinishReason.CANCELLED,
              error: str | None = None, error_kind: ErrorKind | None = None) -> RequestOutput | None:
        """End a live request now (between steps): blocks freed. None if it is not live."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        req.error, req.error_kind = error, error_kind
        return self._finish(req, reason, [])

    def abort_all(self, reason: FinishReason, error: str | None = None,
                  error_kind: ErrorKind | None = None) -> list[RequestOutput]:
        """End every live request (engine failure, drain timeout)."""
        return [self.abort(rid, reason, error, error_kind) for rid in list(self.requests)]

    # ---- the step ----

    def step(self) -> list[RequestOutput]:
        """Schedule and launch one model step; collect a step's sampled tokens, finish what stopped.

        Synchronous: the step launched here is collected here. Async scheduling: the step launched
        by the previous call is collected here, after this call launched the next one."""
        start = time.monotonic()
        outputs: list[RequestOutput] = []
        try:
            launched = self._launch(start, outputs) if self.scheduler.has_work else None
        except BaseException:
            self._inflight = None  # the engine loop aborts every request: nothing left to collect
            raise
        if self.async_scheduling:
            done, self._inflight = self._inflight, launched
        else:
            done = launched
        if done is not None:
            self._collect(done, outputs)
        self.num_steps += 1
        return outputs

    def _launch(self, start: float, outputs: list[RequestOutput]) -> _Launched | None:
        sched = self.scheduler.schedule()
        outputs.extend(self._finished_output(req, []) for req in sched.failed)
        for req in sched.failed:
            del self.requests[req.request_id]
            self.hooks.on_finished(req)
        for req in sched.preempted:
            self._removed.append(req.request_id)
            self.hooks.on_preempted(req)
        for req in sched.admitted:
            self.hooks.on_scheduled(req)
        if not sched.requests:
            return None
        plan = sched.plan
        plan.removed_ids, self._removed = self._removed, []
        seqs = None if self._launches else sched.seqs  # built before the requests advance
        # Advance at schedule time, so the next step is scheduled past this one even before it ran.
        for req, num_new, sample in zip(sched.requests, plan.num_new_tokens, plan.sample):
            req.num_computed_tokens += num_new
            if sample:
                req.num_output_placeholders += 1
        handle = self.runner.launch(plan) if self._launches else _Done(self.runner.execute(seqs))
        return _Launched(sched, handle, start)

    def _collect(self, done: _Launched, outputs: list[RequestOutput]) -> None:
        """Wait for a launched step's tokens and apply them (requests finished meanwhile drop theirs).

        One pass over the step's rows touching plain fields only: a decode that does not stop costs
        an append and a RequestOutput; stop handling, hooks and finishing run only where they apply.
        """
        sched = done.sched
        plan = sched.plan
        results = done.handle.result()
        hooks, eos, max_model_len = self.hooks, self.eos_token_ids, self.max_model_len
        finished = RequestStatus.FINISHED
        num_decode = 0
        num_finished = len(outputs)  # so far only the failed requests of the step just launched
        for req, start, num_new, sample, result in zip(sched.requests, sched.start_pos, plan.num_new_tokens,
                                                       plan.sample, results):
            if sample:
                req.num_output_placeholders -= 1
            if req.status is finished:
                continue  # stopped or aborted after this step was launched: its token is discarded
            if num_new == 1 and sample and start >= len(req.prompt_token_ids):
                num_decode += 1
            else:
                hooks.on_prefill_chunk(req, start, num_new)
            if result is None:
                continue
            output_ids = req.output_token_ids
            index = len(output_ids)
            token = result.token_id
            output_ids.append(token)
            if index == 0:
                hooks.on_first_token(req)
            # Why the request stops with this token (its output number index + 1), if it does: a stop
            # token once min_tokens are out, else the length limits. Inline: it runs for every token.
            params = req.params
            if index >= params.min_tokens and ((token in eos and not params.ignore_eos)
                                                or token in params.stop_token_ids):
                req.stop_token_id = token
                reason = FinishReason.STOP_TOKEN
            elif index >= params.max_tokens - 1 or len(req.prompt_token_ids) + index + 1 >= max_model_len:
                reason = FinishReason.LENGTH
            else:
                outputs.append(RequestOutput(req.request_id, [result], index))
                continue
            outputs.append(self._finish(req, reason, [result]))
            num_finished += 1
        hooks.on_step(StepInfo(
            step=self.num_steps + 1, start_time=done.start_time, duration_s=time.monotonic() - done.start_time,
            num_seqs=len(sched.requests), num_batched_tokens=sched.num_batched_tokens,
            num_decode_seqs=num_decode, num_preempted=len(sched.preempted),
            num_finished=num_finished, request_ids=list(plan.req_ids)))

    def _finish(self, req: Request, reason: FinishReason, tokens: list[SampledToken]) -> RequestOutput:
        self.scheduler.finish(req, reason)
        self._removed.append(req.request_id)
        del self.requests[req.request_id]
        self.hooks.on_finished(req)
        return self._finished_output(req, tokens)

    @staticmethod
    def _finished_output(req: Request, tokens: list[SampledToken]) -> RequestOutput:
        assert req.status is RequestStatus.FINISHED
        return RequestOutput(
            req.request_id, tokens, req.num_output_tokens - len(tokens), finished=True,
            finish_reason=req.finish_reason, stop_token_id=req.stop_token_id,
            num_prompt_tokens=req.num_prompt_tokens, num_output_tokens=req.num_output_tokens,
            error=req.error, error_kind=req.error_kind, num_cached_tokens=req.num_cached_tokens or 0)

    # ---- load ----

    def load(self) -> LoadSnapshot:
        """The current load (taken once per step: running totals kept by the scheduler, plus one
        C-speed pass over the running requests' output lengths)."""
        bm, sched = self.block_manager, self.scheduler
        self._load_version += 1
        return LoadSnapshot(
            version=self._load_version, block_size=bm.block_size, total_blocks=bm.num_blocks,
            free_blocks=bm.num_free_blocks, cached_blocks=bm.num_cached_blocks,
            in_use_blocks=bm.num_in_use_blocks, reserved_blocks=sched.num_reserved_blocks(),
            num_running_requests=len(sched.running), num_waiting_requests=len(sched.waiting),
            num_running_tokens=sched.num_running_tokens(), num_waiting_tokens=sched.num_waiting_tokens(),
            prefix_cache_queries=sched.prefix_cache_queries, prefix_cache_hits=sched.prefix_cache_hits)


__all__ = ["EngineCore", "LoadSnapshot", "Runner", "SchedulerOutput"]
