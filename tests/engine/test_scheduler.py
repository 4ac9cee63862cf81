"""Scheduler: the token-budget rule, chunked prefill, admission, preemption order, exact block ids."""

from __future__ import annotations

from engine_svc.core.block_manager import BlockManager
from engine_svc.core.request import ErrorKind, FinishReason, Request, RequestStatus
from engine_svc.core.scheduler import Scheduler, SchedulerOutput
from engine_svc.sampling_params import SamplingParams


def make(num_blocks=16, block_size=4, budget=16, max_seqs=8, chunked=True) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size), budget, max_seqs, chunked)


def req(rid: str, n: int, max_tokens: int = 100, priority: int = 0) -> Request:
    return Request(rid, list(range(10, 10 + n)), SamplingParams(temperature=0.0, max_tokens=max_tokens),
                   priority=priority)


def plan(out: SchedulerOutput) -> list[tuple]:
    """(id, start position, number of new tokens, sample?, block table) per scheduled seq."""
    return [(s.request_id, s.start_pos, len(s.new_token_ids), s.sample, list(s.block_ids)) for s in out.seqs]


def advance(out: SchedulerOutput, token: int = 7) -> None:
    """What the engine core does after the model step (no stop conditions here)."""
    for r, s in zip(out.requests, out.seqs):
        assert s.new_token_ids == r.token_ids(s.start_pos, s.start_pos + len(s.new_token_ids))
        r.num_computed_tokens += len(s.new_token_ids)
        if s.sample:
            r.output_token_ids.append(token)


def step(s: Scheduler) -> SchedulerOutput:
    out = s.schedule()
    advance(out)
    s.bm.check()
    return out


def ids(reqs) -> list[str]:
    return [r.request_id for r in reqs]


def test_chunked_prefill_then_decode_exact_blocks():
    s = make(budget=8)
    a, b = req("a", 10), req("b", 3)
    s.add(a), s.add(b)
    assert plan(step(s)) == [("a", 0, 8, False, [0, 1])]  # budget spent on a's first chunk
    assert plan(step(s)) == [("a", 8, 2, True, [0, 1, 2]), ("b", 0, 3, True, [3])]
    assert plan(step(s)) == [("a", 10, 1, True, [0, 1, 2]), ("b", 3, 1, True, [3])]
    assert plan(step(s)) == [("a", 11, 1, True, [0, 1, 2]), ("b", 4, 1, True, [3, 4])]
    assert plan(step(s)) == [("a", 12, 1, True, [0, 1, 2, 5]), ("b", 5, 1, True, [3, 4])]
    assert a.output_token_ids == [7] * 4 and b.output_token_ids == [7] * 4


def test_budget_counts_tokens_and_seqs():
    s = make(budget=6, max_seqs=2)
    for rid in "abc":
        s.add(req(rid, 2))
    out = step(s)
    assert plan(out) == [("a", 0, 2, True, [0]), ("b", 0, 2, True, [1])]  # max_num_seqs = 2
    assert out.num_batched_tokens == 4 and ids(s.waiting) == ["c"]


def test_chunking_off_runs_whole_prompts_only():
    s = make(budget=8, chunked=False)
    s.add(req("a", 6)), s.add(req("b", 6))
    assert plan(step(s)) == [("a", 0, 6, True, [0, 1])]  # b (6) does not fit the 2 left
    assert plan(step(s)) == [("a", 6, 1, True, [0, 1]), ("b", 0, 6, True, [2, 3])]


def test_admission_needs_the_whole_sequence_and_keeps_fcfs():
    s = make(num_blocks=4, budget=64)
    s.add(req("a", 8)), s.add(req("b", 12)), s.add(req("c", 4))
    out = step(s)
    assert plan(out) == [("a", 0, 8, True, [0, 1])]
    # b needs 3 blocks, 2 are free: b waits, and c (which would fit) waits behind it.
    assert ids(s.waiting) == ["b", "c"]
    assert ids(out.admitted) == ["a"]


def test_priority_then_fcfs():
    s = make(budget=64)
    for rid, prio in [("a", 0), ("b", -1), ("c", 1), ("d", -1)]:
        s.add(req(rid, 2, priority=prio))
    assert ids(s.waiting) == ["b", "d", "a", "c"]
    assert ids(step(s).admitted) == ["b", "d", "a", "c"]


def test_preempts_newest_running_and_requeues_it_first():
    s = make(num_blocks=4, budget=16)
    a, b, c = req("a", 4), req("b", 4), req("c", 4)
    for r in (a, b, c):
        s.add(r)
    assert plan(step(s)) == [("a", 0, 4, True, [0]), ("b", 0, 4, True, [1]), ("c", 0, 4, True, [2])]
    # Every request needs its second block; one is free. a takes it; b needs one: c (newest) goes.
    out = step(s)
    assert plan(out) == [("a", 4, 1, True, [0, 3]), ("b", 4, 1, True, [1, 2])]
    assert ids(out.preempted) == ["c"] and ids(s.waiting) == ["c"]
    assert (c.status, c.num_computed_tokens, c.output_token_ids) == (RequestStatus.WAITING, 0, [7])
    for _ in range(3):  # positions 5..7 fit in the two blocks each
        assert [p[4] for p in plan(step(s))] == [[0, 3], [1, 2]]
    # a needs a third block at position 8: b (now the newest running) is preempted.
    out = step(s)
    assert plan(out) == [("a", 8, 1, True, [0, 3, 2])]
    assert ids(out.preempted) == ["b"] and ids(s.waiting) == ["b", "c"]  # b in front of c
    assert s.bm.num_free_blocks == 1 and s.num_preemptions == 2


def test_preempted_request_recomputes_prompt_and_output():
    s = make(num_blocks=4, budget=16)
    a, b, c = req("a", 4, max_tokens=3), req("b", 4), req("c", 4)
    for r in (a, b, c):
        s.add(r)
    step(s), step(s)  # c preempted in the second step (as above)
    assert ids(s.waiting) == ["c"]
    s.finish(a, FinishReason.LENGTH)  # frees [0, 3]
    s.bm.check()
    out = step(s)
    # b decodes, c resumes first in line: its prompt + its one output token, recomputed in one chunk.
    assert plan(out) == [("b", 5, 1, True, [1, 2]), ("c", 0, 5, True, [3, 0])]
    assert ids(out.admitted) == ["c"] and c.output_token_ids == [7, 7]


def test_victim_itself_when_it_is_the_newest():
    s = make(num_blocks=2, budget=16)
    a, b = req("a", 4), req("b", 4)
    s.add(a), s.add(b)
    step(s)
    out = step(s)  # a takes the last block; b needs one and is itself the newest
    assert plan(out) == [("a", 4, 1, True, [0, 1])]
    assert ids(out.preempted) == ["b"] and s.bm.block_table("b") == []


def test_request_that_can_never_fit_fails():
    s = make(num_blocks=2, budget=64)
    big = req("big", 9)  # needs 3 blocks of 4
    s.add(big), s.add(req("ok", 4))
    out = step(s)
    assert ids(out.failed) == ["big"] and big.finish_reason is FinishReason.ERROR
    assert big.error_kind is ErrorKind.OUT_OF_KV_CACHE and "3 KV blocks" in big.error
    assert plan(out) == [("ok", 0, 4, True, [0])]


def test_reserved_blocks_count_growth_to_max_tokens():
    s = make(num_blocks=16, budget=64)
    s.add(req("a", 4, max_tokens=12))  # grows to 16 tokens = 4 blocks
    s.add(req("b", 6, max_tokens=1))  # 7 tokens = 2 blocks
    step(s)
    assert s.bm.block_table("a") == [0] and s.bm.block_table("b") == [1, 2]
    assert s.num_reserved_blocks() == 3 + 0
    assert s.num_running_tokens() == 5 + 7 and s.num_waiting_tokens() == 0


def test_finish_waiting_request_and_abort_frees():
    s = make(num_blocks=4, budget=16)
    a, b = req("a", 8), req("b", 12)
    s.add(a), s.add(b)
    step(s)
    s.finish(b, FinishReason.CANCELLED)  # still waiting
    s.finish(a, FinishReason.CANCELLED)  # running
    assert not s.has_work and s.bm.num_free_blocks == 4
    s.bm.check()
