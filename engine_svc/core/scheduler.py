"""The scheduler: which tokens of which requests run in the next step. Imports no torch.

One rule (stated again at the top of ``schedule``): every request has ``num_tokens`` (prompt +
generated) and ``num_computed_tokens`` (positions whose K/V are cached); a step gives requests
tokens to compute, filling a budget of ``max_num_batched_tokens`` tokens and ``max_num_seqs``
sequences, running requests first, then waiting ones. Decode (one token), prefill, chunked prefill
and recompute after preemption are all the same thing: computing the positions in between.

The scheduler owns the waiting and running queues and talks to the block manager only through
``lookup`` / ``take_prefix`` / ``allocate`` / ``cache_blocks`` / ``free`` (it never sees the free list).
Prefix caching enters at admission only: a request starts with num_computed_tokens = its longest
cached prefix (full blocks, at least its last token left to compute), so the rule above computes
just the uncached suffix.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from engine_svc.core.block_manager import BlockManager
from engine_svc.core.prefix_cache import PrefixHit
from engine_svc.core.request import ErrorKind, FinishReason, Request, RequestStatus
from engine_svc.step import NewSeq, ScheduledSeq, StepPlan
from kvmesh.prefix_hash import extend_block_hashes


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
class _Budget:
    tokens: int
    seqs: int


class Scheduler:
    """FCFS (with optional priority) continuous batching over a paged KV cache.

    Args:
        block_manager: the KV block pool (the scheduler allocates and frees through it only).
        max_num_batched_tokens: the per-step token budget.
        max_num_seqs: sequences per step at most (= running requests at most).
        enable_chunked_prefill: split prompts across steps to fit the budget; when off, a prompt
            runs whole in one step (EngineConfig.validate keeps max_model_len within the budget).
    """

    def __init__(self, block_manager: BlockManager, max_num_batched_tokens: int, max_num_seqs: int,
                 enable_chunked_prefill: bool = True):
        self.bm = block_manager
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: list[Request] = []  # sorted by _waiting_key: priority, then FCFS; preempted first
        self._waiting_keys: list[tuple[int, int]] = []
        self.running: list[Request] = []  # in admission order: running[-1] is the newest
        self._next_arrival = 0
        self._next_front = -1  # keys below every arrival: requeued-at-the-front requests
        self.num_preemptions = 0  # total since start (metrics)
        # Prefix cache, in tokens, since start (metrics): queries = the tokens of every admitted
        # sequence that looked the cache up, hits = the tokens found cached (vLLM's definition).
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ---- queue changes (commands from the engine core) ----

    def add(self, request: Request) -> None:
        """Queue a new request (status WAITING). Its id must not be live (the service checks)."""
        request.arrival = self._next_arrival
        self._next_arrival += 1
        request.status = RequestStatus.WAITING
        self._enqueue(request, (request.priority, request.arrival))

    def finish(self, request: Request, reason: FinishReason) -> None:
        """Remove a request from its queue for good and free its blocks."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            i = self.waiting.index(request)
            del self.waiting[i], self._waiting_keys[i]
        self._cache_computed(request)
        self.bm.free(request.request_id)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- the step decision ----

    def schedule(self) -> SchedulerOutput:
        """Decide the next step.

        The rule: each request has num_computed_tokens and num_tokens; give each scheduled request
        up to num_tokens - num_computed_tokens new tokens while the budget (max_num_batched_tokens
        tokens, max_num_seqs sequences) lasts. Running requests come first, decodes before chunks
        of ongoing prefills, so admitted work keeps moving; then waiting requests in priority/FCFS
        order, admitted only when their whole known sequence fits in free blocks (never overcommit).
        When a running request cannot get a block, the newest running request is preempted by
        recompute (blocks freed, requeued at the front) until it can, or until it is the victim.
        """
        out = SchedulerOutput(_block_table=self.bm.block_table)
        budget = _Budget(self.max_num_batched_tokens, self.max_num_seqs)
        for req in self.running:  # blocks the last step filled become findable by later requests
            self._cache_computed(req)
        self._schedule_running(out, budget)
        if not out.preempted:  # a step that had to preempt admits nothing (it would thrash)
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: _Budget) -> None:
        order = [r for r in self.running if not r.is_prefill] + [r for r in self.running if r.is_prefill]
        for req in order:
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            if budget.seqs == 0 or budget.tokens == 0:
                break
            if req.awaits_last_token:
                continue  # its last token is still being sampled (async scheduling): nothing to run
            num_new = self._chunk(req, budget)
            if num_new == 0:
                continue  # chunking off and the rest does not fit this step's budget
            while (allocation := self.bm.allocate(req.request_id, req.num_computed_tokens + num_new)) is None:
                victim = self.running[-1]
                self._preempt(victim, out, budget)
                if victim is req:
                    break
            if req.status is RequestStatus.RUNNING:
                self._add_seq(out, budget, req, num_new)
                if allocation.new_block_ids:
                    out.plan.new_block_ids.append((req.request_id, allocation.new_block_ids))

    def _schedule_waiting(self, out: SchedulerOutput, budget: _Budget) -> None:
        # Blocks already promised: what running prefills still need to hold their known tokens.
        promised = sum(self.bm.num_blocks_needed(r.request_id, r.num_tokens) for r in self.running)
        while self.waiting and budget.seqs > 0 and budget.tokens > 0 \
                and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            need = self.bm.num_blocks_for(req.num_tokens)
            if need > self.bm.num_blocks:
                self._pop_waiting()
                self.bm.free(req.request_id)
                req.status = RequestStatus.FINISHED
                req.finish_reason = FinishReason.ERROR
                req.error_kind = ErrorKind.OUT_OF_KV_CACHE
                req.error = (f"the sequence needs {need} KV blocks of {self.bm.block_size} tokens, "
                             f"more than the cache holds ({self.bm.num_blocks})")
                out.failed.append(req)
                continue
            hit = self._lookup(req)
            num_cached = len(hit.block_ids) * self.bm.block_size
            if need - len(hit.block_ids) > self.bm.num_available_blocks - hit.num_evictable - promised:
                break  # head of line waits: FCFS, and admission never overcommits
            req.num_computed_tokens = num_cached
            num_new = self._chunk(req, budget)
            if num_new == 0:
                req.num_computed_tokens = 0
                break
            self._count_prefix_hit(req, num_cached)
            self.bm.take_prefix(req.request_id, hit)
            allocation = self.bm.allocate(req.request_id, num_cached + num_new)
            assert allocation is not None, "admission checked the available blocks"
            promised += need - allocation.num_blocks
            self._pop_waiting()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.admitted.append(req)
            self._add_seq(out, budget, req, num_new, joins=True)

    # ---- prefix caching ----

    def _hashes(self, req: Request, num_blocks: int) -> list[int]:
        """The request's block hashes, grown to cover its first num_blocks blocks."""
        bs = self.bm.block_size
        return extend_block_hashes(req.block_hashes, num_blocks,
                                   lambda i: req.token_ids(i * bs, (i + 1) * bs), req.cache_salt)

    def _lookup(self, req: Request) -> PrefixHit:
        """The request's longest cached prefix (nothing when caching is off or the request opts out)."""
        if not (self.bm.enable_prefix_caching and req.use_prefix_cache):
            return PrefixHit([], 0)
        self._hashes(req, (req.num_tokens - 1) // self.bm.block_size)
        return self.bm.lookup(req.block_hashes, req.token_ids, req.num_tokens)

    def _count_prefix_hit(self, req: Request, num_cached: int) -> None:
        if req.num_cached_tokens is None:  # the first admission is what the client sees
            req.num_cached_tokens = min(num_cached, req.num_prompt_tokens)
        if self.bm.enable_prefix_caching and req.use_prefix_cache:
            self.prefix_cache_queries += req.num_tokens
            self.prefix_cache_hits += num_cached

    def _cache_computed(self, req: Request) -> None:
        """Make the request's fully computed blocks findable (before its blocks are released)."""
        if not (self.bm.enable_prefix_caching and req.use_prefix_cache):
            return
        # Only positions whose token ids are known (an overlapped step may have computed a token
        # the engine then discarded, past a stop) and whose KV is computed.
        known = req.num_prompt_tokens + req.num_output_tokens
        num_full = min(req.num_computed_tokens, known) // self.bm.block_size
        if num_full > self.bm.num_hashed(req.request_id):
            self.bm.cache_blocks(req.request_id, self._hashes(req, num_full), num_full, req.token_ids,
                                 req.cache_salt)

    # ---- helpers ----

    def _chunk(self, req: Request, budget: _Budget) -> int:
        """Tokens this request computes this step (0 = it does not fit the budget)."""
        remaining = req.num_remaining_tokens
        if remaining <= budget.tokens:
            return remaining
        return budget.tokens if self.enable_chunked_prefill else 0

    def _add_seq(self, out: SchedulerOutput, budget: _Budget, req: Request, num_new: int,
                 joins: bool = False) -> None:
        """Put num_new tokens of req in the step; joins: it enters the runner's batch (admitted)."""
        start = req.num_computed_tokens
        plan = out.plan
        if joins:
            plan.new_seqs.append(NewSeq(req.request_id, req.prompt_token_ids, req.output_token_ids, start,
                                        list(self.bm.block_table(req.request_id)), req.params))
        plan.req_ids.append(req.request_id)
        plan.num_new_tokens.append(num_new)
        plan.sample.append(start + num_new == req.num_tokens + req.num_output_placeholders)
        out.requests.append(req)
        out.start_pos.append(start)
        out.num_batched_tokens += num_new
        budget.tokens -= num_new
        budget.seqs -= 1

    def _preempt(self, req: Request, out: SchedulerOutput, budget: _Budget) -> None:
        """Preempt by recompute: free the blocks, forget the computed tokens, requeue at the front.

        If the victim was already scheduled this step, it is taken out of the step again.
        """
        if req in out.requests:
            i = out.requests.index(req)
            plan = out.plan
            num_new = plan.num_new_tokens[i]
            del plan.req_ids[i], plan.num_new_tokens[i], plan.sample[i], out.requests[i], out.start_pos[i]
            plan.new_block_ids = [(rid, b) for rid, b in plan.new_block_ids if rid != req.request_id]
            out.num_batched_tokens -= num_new
            budget.tokens += num_new
            budget.seqs += 1
        self.running.remove(req)
        self._cache_computed(req)  # its recompute will find these blocks, unless they are evicted
        self.bm.free(req.request_id)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.num_preemptions += 1
        # Each preemption goes in front of the previous ones: the newest victim of a step is
        # preempted first, so the oldest ends up first in line.
        self._enqueue(req, (req.priority, self._next_front))
        self._next_front -= 1
        out.preempted.append(req)

    def _enqueue(self, req: Request, key: tuple[int, int]) -> None:
        i = bisect.bisect_left(self._waiting_keys, key)
        self._waiting_keys.insert(i, key)
        self.waiting.insert(i, req)

    def _pop_waiting(self) -> Request:
        del self._waiting_keys[0]
        return self.waiting.pop(0)

    # ---- load (read by the engine core for LoadReport) ----

    def num_reserved_blocks(self) -> int:
        """Blocks running requests still need to reach their max_tokens (or max_model_len)."""
        return sum(self.bm.num_blocks_needed(r.request_id, r.max_num_tokens) for r in self.running)

    def num_running_tokens(self) -> int:
        return sum(r.num_tokens for r in self.running)

    def num_waiting_tokens(self) -> int:
        return sum(r.num_prompt_tokens for r in self.waiting)
