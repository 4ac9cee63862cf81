"""The accounting invariant after every step of hypothesis-generated add/abort/finish sequences.

Drives the real EngineCore (scheduler + block manager + stop conditions) with a runner that
returns scripted tokens, so requests finish by EOS, stop ids and max_tokens at random points;
synchronously (execute), and with async scheduling (launch: StepPlan differences, placeholders,
stops one step late), where the runner rebuilds each row's block table from the plans alone.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine_svc.core.engine_core import EngineCore
from engine_svc.core.request import Request, RequestStatus
from engine_svc.sampling_params import SamplingParams
from engine_svc.step import SampledToken, ScheduledSeq
from core_steps import step_until_idle

EOS = 2
BUDGET, MAX_SEQS = 12, 4


class ScriptedRunner:
    """Returns tokens from a script (cycled), checking what a model runner relies on."""

    def __init__(self, tokens: list[int], block_size: int):
        self.tokens, self.block_size, self.i = tokens, block_size, 0
        self.steps: list[list[ScheduledSeq]] = []

    def execute(self, seqs):
        assert len(seqs) <= MAX_SEQS and sum(len(s.new_token_ids) for s in seqs) <= BUDGET
        assert len({s.request_id for s in seqs}) == len(seqs)
        out = []
        for s in seqs:
            end = s.start_pos + len(s.new_token_ids)
            assert len(s.block_ids) * self.block_size >= end, "block table too short"
            assert len(set(s.block_ids)) == len(s.block_ids)
            if s.sample:
                out.append(SampledToken(self.tokens[self.i % len(self.tokens)]))
                self.i += 1
            else:
                out.append(None)
        self.steps.append(seqs)
        return out


class _Ready:
    def __init__(self, results):
        self._results = results

    def result(self):
        return self._results


class PlanRunner(ScriptedRunner):
    """The same script through launch(StepPlan): rows kept from the plans' differences, as the
    model runner's persistent batch keeps them, and checked against the block manager's tables."""

    def __init__(self, tokens: list[int], block_size: int):
        super().__init__(tokens, block_size)
        self.rows: dict[str, list] = {}  # request id -> [computed tokens, block table]
        self.block_manager = None  # set once the core exists

    def launch(self, plan):
        assert len(plan.req_ids) <= MAX_SEQS and sum(plan.num_new_tokens) <= BUDGET
        assert len(set(plan.req_ids)) == len(plan.req_ids)
        for rid in plan.removed_ids:
            self.rows.pop(rid, None)
        for seq in plan.new_seqs:
            self.rows[seq.request_id] = [seq.start_pos, list(seq.block_ids)]
        for rid, blocks in plan.new_block_ids:
            self.rows[rid][1].extend(blocks)
        out = []
        for rid, n, sample in zip(plan.req_ids, plan.num_new_tokens, plan.sample):
            row = self.rows[rid]
            row[0] += n
            assert row[1] == self.block_manager.block_table(rid), "the plan's differences lost a block"
            assert len(row[1]) * self.block_size >= row[0], "block table too short"
            out.append(SampledToken(self.tokens[self.i % len(self.tokens)]) if sample else None)
            self.i += sample
        return _Ready(out)


def check(core: EngineCore) -> None:
    bm, sched = core.block_manager, core.scheduler
    bm.check()
    assert bm.num_free_blocks + bm.num_cached_blocks + bm.num_in_use_blocks == bm.num_blocks
    held = sum(len(bm.block_table(r.request_id)) for r in sched.running)
    assert held == bm.num_in_use_blocks  # nothing shared, nothing leaked
    for r in sched.waiting:
        assert r.status is RequestStatus.WAITING and bm.block_table(r.request_id) == []
    for r in sched.running:
        assert r.status is RequestStatus.RUNNING
        assert len(bm.block_table(r.request_id)) * bm.block_size >= r.num_computed_tokens
        assert r.hashed_up_to == bm.num_hashed(r.request_id) * bm.block_size  # the scheduler's mirror
    sched.check_totals()  # the O(1) load figures agree with a recount
    assert set(core.requests) == {r.request_id for r in sched.waiting + sched.running}
    if not core.requests:
        assert bm.num_free_blocks == bm.num_blocks


ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(1, 20), st.integers(1, 12), st.integers(-1, 1)),
    st.tuples(st.just("abort"), st.integers(0, 30)),
    st.tuples(st.just("step"), st.integers(1, 3)),
), max_size=40)


@pytest.mark.parametrize("overlap", [False, True])
@settings(max_examples=150, deadline=None)
@given(ops=ops, tokens=st.lists(st.sampled_from([5, 6, 7, EOS, 9]), min_size=1, max_size=8),
       num_blocks=st.integers(5, 12), chunked=st.booleans(), block_size=st.sampled_from([2, 4]))
def test_invariant_after_every_step(overlap, ops, tokens, num_blocks, chunked, block_size):
    runner = (PlanRunner if overlap else ScriptedRunner)(tokens, block_size)
    core = EngineCore(runner, num_blocks=num_blocks, block_size=block_size, eos_token_ids=[EOS],
                      max_model_len=BUDGET if not chunked else 40, max_num_batched_tokens=BUDGET,
                      max_num_seqs=MAX_SEQS, enable_chunked_prefill=chunked, async_scheduling=overlap)
    assert core.async_scheduling is overlap
    runner.block_manager = core.block_manager
    added, finished = [], {}
    for op in ops:
        if op[0] == "add":
            _, n, max_tokens, prio = op
            rid = f"r{len(added)}"
            n = min(n, core.max_model_len - 1)
            max_tokens = min(max_tokens, core.max_model_len - n)
            core.add(Request(rid, [3] * n, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                          stop_token_ids=[9]), priority=prio))
            added.append(rid)
        elif op[0] == "abort":
            if added:
                out = core.abort(added[op[1] % len(added)])
                if out is not None:
                    finished[out.request_id] = out
        else:
            for _ in range(op[1]):
                for out in core.step():
                    if out.finished:
                        assert out.request_id not in finished
                        finished[out.request_id] = out
                check(core)
        check(core)
    step_until_idle(core, finished, check)  # everything finishes (no livelock), and every block comes back
    assert not core.has_work and set(finished) == set(added)
    assert core.block_manager.num_free_blocks == num_blocks
    for out in finished.values():
        if out.finish_reason.value == "stop_token":
            assert out.stop_token_id in (EOS, 9)
