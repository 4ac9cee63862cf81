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

Per-step cost: the engine plans step N+1 while the GPU runs step N, so a steady decode step must
cost little CPU. The decodes are scheduled in one pass over plain counters (_split_running,
_schedule_decodes); only requests that enter a new block, fill one (prefix caching), join, leave
or are preempted reach the block manager, and the load figures are running totals
(bench/core_step.py measures it).
"""

from __future__ import annotations

import bisect
import operator

from engine_svc.core.block_manager import BlockManager
from engine_svc.core.prefix_cache import PrefixHit
from engine_svc.core.request import ErrorKind, FinishReason, Request, RequestStatus
from engine_svc.core.scheduler_output import Budget, SchedulerOutput
from engine_svc.step import NewSeq
from kvmesh.prefix_hash import extend_block_hashes

_output_ids = operator.attrgetter("output_token_ids")

__all__ = ["Scheduler", "SchedulerOutput"]


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
        # Running totals for load reports (see num_reserved_blocks): blocks in running tables,
        # blocks running requests would hold at their longest, their prompt tokens, and waiting ones'.
        self._num_running_blocks = 0
        self._num_running_max_blocks = 0
        self._num_running_prompt_tokens = 0
        self._num_waiting_tokens = 0

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
            self._leave_running(request)
        elif request.status is RequestStatus.WAITING:
            i = self.waiting.index(request)
            del self.waiting[i], self._waiting_keys[i]
            self._num_waiting_tokens -= len(request.prompt_token_ids)
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
        budget = Budget(self.max_num_batched_tokens, self.max_num_seqs)
        decodes, prefills = self._split_running()
        unscheduled = self._schedule_decodes(decodes, out, budget)
        for req in prefills:
            if req.status is RequestStatus.RUNNING:  # not preempted earlier in this step
                if budget.seqs == 0 or budget.tokens == 0:
                    break
                self._schedule_one(req, out, budget)
        if not out.preempted:  # a step that had to preempt admits nothing (it would thrash)
            self._schedule_waiting(out, budget, prefills + unscheduled)
        return out

    def _split_running(self) -> tuple[list[Request], list[Request]]:
        """The running requests in admission order, in one pass over plain counters: decodes (just
        the last sampled token to compute) and the rest (prompt chunks, recompute). Requests with
        nothing to compute (their last possible token is still being sampled) are in neither.

        It also makes the blocks the last step filled findable by later requests (prefix caching),
        calling the block manager only for a request that filled one (req.hashed_up_to says).
        """
        decodes: list[Request] = []
        prefills: list[Request] = []
        bs = self.bm.block_size
        caching = self.bm.enable_prefix_caching
        for req in self.running:
            num_output = len(req.output_token_ids)
            num_known = len(req.prompt_token_ids) + num_output
            computed = req.num_computed_tokens
            if caching and min(computed, num_known) >= req.hashed_up_to + bs and req.use_prefix_cache:
                self._cache_computed(req)
            placeholders = req.num_output_placeholders
            remaining = num_known + placeholders - computed
            if remaining > 1 or num_output + placeholders == 0:
                prefills.append(req)
            elif remaining == 1 and not (  # Request.awaits_last_token, inline
                    placeholders and (num_output + placeholders >= req.params.max_tokens
                                      or (req.max_model_len is not None
                                          and num_known + placeholders >= req.max_model_len))):
                decodes.append(req)
        return decodes, prefills

    def _schedule_decodes(self, decodes: list[Request], out: SchedulerOutput, budget: Budget) -> list[Request]:
        """One token each, in order, while the budget lasts. Returns the decodes left unscheduled
        when it ran out.

        Why a loop of its own: it is most of every step, so per request it reads one counter and
        keeps the request aside; the step's lists grow by whole runs (_add_decodes). The block
        manager is called only for a request that enters a new block this step, i.e. whose
        computed tokens are a multiple of the block size (its table holds at least the blocks its
        computed tokens need, and only a new block's first token needs one more). When no block is
        left, that request takes the general path (_schedule_one: preemption), after the run
        before it is added, so the batch order stays the running order.
        """
        bs = self.bm.block_size
        allocate = self.bm.allocate
        new_block_ids = out.plan.new_block_ids
        running = RequestStatus.RUNNING
        run: list[Request] = []
        limit = min(budget.tokens, budget.seqs)  # decodes the budget still takes (one token each)
        for i, req in enumerate(decodes):
            if len(run) == limit:
                self._add_decodes(run, out, budget)
                return decodes[i:]
            if req.status is not running:
                continue  # preempted earlier in this loop
            computed = req.num_computed_tokens
            if computed % bs == 0:  # enters a new block
                allocation = allocate(req.request_id, computed + 1)
                if allocation is None:  # no block left: preempt (general path, rare)
                    self._add_decodes(run, out, budget)
                    run = []
                    self._schedule_one(req, out, budget)
                    limit = min(budget.tokens, budget.seqs)
                    new_block_ids = out.plan.new_block_ids  # a preemption rebuilds the list
                    continue
                if allocation.new_block_ids:
                    self._num_running_blocks += len(allocation.new_block_ids)
                    new_block_ids.append((req.request_id, allocation.new_block_ids))
            run.append(req)
        self._add_decodes(run, out, budget)
        return []

    @staticmethod
    def _add_decodes(run: list[Request], out: SchedulerOutput, budget: Budget) -> None:
        """Put a run of decodes (one token each, sampled, no new block) in the step."""
        n = len(run)
        if not n:
            return
        plan = out.plan
        plan.req_ids.extend([req.request_id for req in run])
        plan.num_new_tokens.extend([1] * n)
        plan.sample.extend([True] * n)
        out.requests.extend(run)
        out.start_pos.extend([req.num_computed_tokens for req in run])
        out.num_batched_tokens += n
        budget.tokens -= n
        budget.seqs -= n

    def _schedule_one(self, req: Request, out: SchedulerOutput, budget: Budget) -> None:
        """Schedule a running request's next chunk: allocate its blocks, preempting the newest
        running requests while they do not fit (the request itself may be the victim)."""
        if req.awaits_last_token:
            return  # its last token is still being sampled (async scheduling): nothing to run
        num_new = self._chunk(req, budget)
        if num_new == 0:
            return  # chunking off and the rest does not fit this step's budget
        while (allocation := self.bm.allocate(req.request_id, req.num_computed_tokens + num_new)) is None:
            victim = self.running[-1]
            self._preempt(victim, out, budget)
            if victim is req:
                return
        self._add_seq(out, budget, req, num_new)
        if allocation.new_block_ids:
            self._num_running_blocks += len(allocation.new_block_ids)
            out.plan.new_block_ids.append((req.request_id, allocation.new_block_ids))

    def _schedule_waiting(self, out: SchedulerOutput, budget: Budget, not_covered: list[Request]) -> None:
        """Admit waiting requests. not_covered: the running requests whose tables may not hold all
        their known tokens yet (prefills, decodes the budget left out); the others need no blocks."""
        promised = None
        while self.waiting and budget.seqs > 0 and budget.tokens > 0 \
                and len(self.running) < self.max_num_seqs:
            if promised is None:  # blocks already promised to running requests for their known tokens
                promised = sum(self.bm.num_blocks_needed(r.request_id, r.num_tokens)
                               for r in not_covered if r.status is RequestStatus.RUNNING)
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
            req.hashed_up_to = num_cached
            allocation = self.bm.allocate(req.request_id, num_cached + num_new)
            assert allocation is not None, "admission checked the available blocks"
            promised += need - allocation.num_blocks
            self._pop_waiting()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            self._num_running_blocks += allocation.num_blocks
            self._num_running_max_blocks += self.bm.num_blocks_for(req.max_num_tokens)
            self._num_running_prompt_tokens += len(req.prompt_token_ids)
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
        bm = self.bm
        if not (bm.enable_prefix_caching and req.use_prefix_cache):
            return
        # Only positions whose token ids are known (an overlapped step may have computed a token
        # the engine then discarded, past a stop) and whose KV is computed.
        known = len(req.prompt_token_ids) + len(req.output_token_ids)
        num_full = min(req.num_computed_tokens, known) // bm.block_size
        if num_full * bm.block_size > req.hashed_up_to:  # hashed_up_to mirrors bm.num_hashed
            bm.cache_blocks(req.request_id, self._hashes(req, num_full), num_full, req.token_ids, req.cache_salt)
            req.hashed_up_to = num_full * bm.block_size

    # ---- helpers ----

    def _chunk(self, req: Request, budget: Budget) -> int:
        """Tokens this request computes this step (0 = it does not fit the budget)."""
        remaining = req.num_remaining_tokens
        if remaining <= budget.tokens:
            return remaining
        return budget.tokens if self.enable_chunked_prefill else 0

    def _add_seq(self, out: SchedulerOutput, budget: Budget, req: Request, num_new: int,
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

    def _preempt(self, req: Request, out: SchedulerOutput, budget: Budget) -> None:
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
        self._leave_running(req)
        self._cache_computed(req)  # its recompute will find these blocks, unless they are evicted
        self.bm.free(req.request_id)
        req.num_computed_tokens = 0
        req.hashed_up_to = 0
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
        self._num_waiting_tokens += len(req.prompt_token_ids)

    def _pop_waiting(self) -> Request:
        del self._waiting_keys[0]
        req = self.waiting.pop(0)
        self._num_waiting_tokens -= len(req.prompt_token_ids)
        return req

    def _leave_running(self, req: Request) -> None:
        """Take a request out of the running set and out of the running totals (before its blocks
        are freed)."""
        self.running.remove(req)
        self._num_running_blocks -= len(self.bm.block_table(req.request_id))
        self._num_running_max_blocks -= self.bm.num_blocks_for(req.max_num_tokens)
        self._num_running_prompt_tokens -= len(req.prompt_token_ids)

    # ---- load (read by the engine core for LoadReport) ----

    # Kept as running totals, updated where requests join and leave the queues and where running
    # tables grow, so that a load report costs O(1) and not O(running); check_totals recomputes them.

    def num_reserved_blocks(self) -> int:
        """Blocks running requests still need to reach their max_tokens (or max_model_len)."""
        return self._num_running_max_blocks - self._num_running_blocks

    def num_running_tokens(self) -> int:
        # The generated part grows outside the scheduler (the engine core appends tokens): one
        # C-speed pass over the output lists, no per-request Python.
        return self._num_running_prompt_tokens + sum(map(len, map(_output_ids, self.running)))

    def num_waiting_tokens(self) -> int:
        return self._num_waiting_tokens

    def check_totals(self) -> None:
        """Assert the running totals against a recount from scratch (tests; O(requests))."""
        bm = self.bm
        assert self.num_reserved_blocks() == sum(bm.num_blocks_needed(r.request_id, r.max_num_tokens)
                                                 for r in self.running)
        assert self._num_running_blocks == sum(len(bm.block_table(r.request_id)) for r in self.running)
        assert self.num_running_tokens() == sum(r.num_tokens for r in self.running)
        assert self.num_waiting_tokens() == sum(r.num_prompt_tokens for r in self.waiting)
