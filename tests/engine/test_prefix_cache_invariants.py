"""Prefix caching under hypothesis-generated adds, aborts, finishes and preemptions.

The runner is a fake KV cache: it writes each computed token id into its slot (block, offset) and,
before every step, checks that every position the request does NOT compute (its cached prefix or
its earlier steps) holds that request's token: so a block shared wrongly, evicted while in use or
overwritten by another request shows up as a wrong token. It also checks that a step writes only
into blocks no other request references (shared blocks are read-only).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from engine_svc.core.engine_core import EngineCore
from engine_svc.core.request import Request, RequestStatus
from engine_svc.sampling_params import SamplingParams
from engine_svc.step import SampledToken
from core_steps import step_until_idle

EOS = 2
BUDGET, MAX_SEQS = 16, 4


class FakeKvRunner:
    def __init__(self, core_ref: list, tokens: list[int], block_size: int, num_blocks: int):
        self.core_ref, self.tokens, self.bs, self.i = core_ref, tokens, block_size, 0
        self.kv = [[None] * block_size for _ in range(num_blocks)]
        self.num_computed = 0

    def execute(self, seqs):
        core = self.core_ref[0]
        bm = core.block_manager
        out = []
        for s in seqs:
            req = core.requests[s.request_id]
            for pos in range(s.start_pos):  # the prefix it reads: cached or computed earlier
                b, off = s.block_ids[pos // self.bs], pos % self.bs
                assert self.kv[b][off] == req.token_ids(pos, pos + 1)[0], (s.request_id, pos, b)
            for k, tok in enumerate(s.new_token_ids):
                pos = s.start_pos + k
                b = s.block_ids[pos // self.bs]
                assert bm._ref_counts[b] == 1, f"{s.request_id} writes into shared block {b}"
                self.kv[b][pos % self.bs] = tok
            self.num_computed += len(s.new_token_ids)
            if s.sample:
                out.append(SampledToken(self.tokens[self.i % len(self.tokens)]))
                self.i += 1
            else:
                out.append(None)
        return out


def check(core: EngineCore) -> None:
    bm, sched = core.block_manager, core.scheduler
    bm.check()  # free + cached + in use == total, ref counts == tables, states disjoint
    assert bm.num_free_blocks + bm.num_cached_blocks + bm.num_in_use_blocks == bm.num_blocks
    for r in sched.waiting:
        assert r.status is RequestStatus.WAITING and bm.block_table(r.request_id) == []
    for r in sched.running:
        assert len(bm.block_table(r.request_id)) * bm.block_size >= r.num_computed_tokens
        assert r.num_computed_tokens < r.num_tokens or r.num_output_tokens > 0
        assert r.hashed_up_to == bm.num_hashed(r.request_id) * bm.block_size  # the scheduler's mirror
    sched.check_totals()  # the O(1) load figures agree with a recount
    if not core.requests:
        assert bm.num_in_use_blocks == 0


# Prompts drawn from a few shared "system prompts" plus a short random tail, so hits are common.
SYSTEMS = [[3, 4, 5, 6, 7, 8, 9, 10], [3, 4, 5, 6, 11, 12], [13] * 7]
ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(0, 2), st.lists(st.integers(3, 20), max_size=6),
              st.integers(1, 8), st.booleans()),
    st.tuples(st.just("abort"), st.integers(0, 30)),
    st.tuples(st.just("step"), st.integers(1, 4)),
), max_size=40)


@settings(max_examples=150, deadline=None)
@given(ops=ops, tokens=st.lists(st.sampled_from([5, 6, 7, EOS, 9]), min_size=1, max_size=8),
       num_blocks=st.integers(6, 14), block_size=st.sampled_from([2, 4]))
def test_shared_blocks_stay_correct_and_accounted_after_every_step(ops, tokens, num_blocks, block_size):
    ref: list = []
    runner = FakeKvRunner(ref, tokens, block_size, num_blocks)
    core = EngineCore(runner, num_blocks=num_blocks, block_size=block_size, eos_token_ids=[EOS],
                      max_model_len=40, max_num_batched_tokens=BUDGET, max_num_seqs=MAX_SEQS,
                      enable_prefix_caching=True)
    ref.append(core)
    added, finished = [], {}
    for op in ops:
        if op[0] == "add":
            _, system, tail, max_tokens, salted = op
            rid = f"r{len(added)}"
            core.add(Request(rid, SYSTEMS[system] + tail, SamplingParams(
                temperature=0.0, max_tokens=max_tokens, stop_token_ids=[9]),
                cache_salt="s" if salted and system == 2 else ""))
            added.append(rid)
        elif op[0] == "abort":
            if added and (out := core.abort(added[op[1] % len(added)])) is not None:
                finished[out.request_id] = out
        else:
            for _ in range(op[1]):
                for out in core.step():
                    if out.finished:
                        finished[out.request_id] = out
                check(core)
        check(core)
    step_until_idle(core, finished, check)  # everything finishes (no livelock), and every block comes back
    assert not core.has_work and set(finished) == set(added)
    bm = core.block_manager
    assert bm.num_in_use_blocks == 0 and bm.num_free_blocks + bm.num_cached_blocks == num_blocks
    sched = core.scheduler
    assert 0 <= sched.prefix_cache_hits <= sched.prefix_cache_queries
