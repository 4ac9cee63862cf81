"""Prefix caching through the real engine core and stories260k (fp32, CPU).

Oracle: greedy_examples.json. A prompt extended by the first k expected ids must continue with
expected ids k, k+1, ...; so requests that share prefixes with earlier ones (prompts, and the blocks
earlier requests generated) have known answers, with the cache on and off.
"""

from __future__ import annotations

import pytest
from engine_driver import build_core, examples, greedy, one_torch_thread, run

_threads = pytest.fixture(autouse=True, scope="module")(one_torch_thread)

BS = 16


class CountingRunner:
    """Wraps the real runner: counts the tokens each step computes."""

    def __init__(self, runner):
        self.runner, self.num_computed = runner, 0

    def execute(self, seqs):
        self.num_computed += sum(len(s.new_token_ids) for s in seqs)
        return self.runner.execute(seqs)

    def launch(self, plan):  # the overlapped runner surface (engine_svc/step.py StepPlan)
        self.num_computed += sum(plan.num_new_tokens)
        return self.runner.launch(plan)


def counting(core):
    core.runner = CountingRunner(core.runner)
    return core.runner


@pytest.fixture(scope="module")
def ex(stories260k_dir):
    return examples(stories260k_dir)


@pytest.fixture(scope="module")
def core_on(stories260k_dir):
    return build_core(stories260k_dir, prefix_caching=True)


@pytest.fixture(scope="module")
def core_off(stories260k_dir):
    return build_core(stories260k_dir, prefix_caching=False)


def continuations(ex, ks, max_tokens):
    """Requests whose prompts are example prompts plus k expected ids, and their expected output."""
    reqs, want = [], {}
    for i, e in enumerate(ex):
        for k in ks:
            rid = f"{i}-{k}"
            reqs.append(greedy(rid, e["prompt_ids"] + e["expected_ids"][:k], max_tokens, ignore_eos=True))
            want[rid] = e["expected_ids"][k:k + max_tokens]
    return reqs, want


def test_shared_system_prompt_is_computed_once(core_on, core_off, ex):
    core = core_on
    runner = counting(core)
    hits0, queries0 = core.scheduler.prefix_cache_hits, core.scheduler.prefix_cache_queries
    system = [(7 * i + 3) % 500 + 5 for i in range(4 * BS)]  # 64 tokens: 4 full blocks, seen nowhere else
    tails = [e["prompt_ids"][1:6] for e in ex] + [[7, 8, 9], [10], [11, 12, 13, 14, 15, 16, 17]]
    reqs = [greedy(f"u{i}", system + tail, 4, ignore_eos=True) for i, tail in enumerate(tails)]
    first = run(core, reqs[:1])  # the system prompt is computed here
    rest = run(core, reqs[1:])  # ... and only read here
    decode = len(reqs) * 3  # 4 tokens each: the last sampled one is never computed
    assert runner.num_computed == len(system) + sum(len(t) for t in tails) + decode
    assert [r.num_cached_tokens for r in reqs] == [0] + [len(system)] * (len(reqs) - 1)
    assert core.scheduler.prefix_cache_hits - hits0 == len(system) * (len(reqs) - 1)
    assert core.scheduler.prefix_cache_queries - queries0 == sum(len(system) + len(t) for t in tails)
    core.runner = runner.runner
    # The same requests without the cache: identical tokens, the system prompt computed each time.
    off = core_off
    off_runner = counting(off)
    again = [greedy(r.request_id, r.prompt_token_ids, 4, ignore_eos=True) for r in reqs]
    base = run(off, again)
    assert {k: v.tokens for k, v in {**first, **rest}.items()} == {k: v.tokens for k, v in base.items()}
    assert off_runner.num_computed == runner.num_computed + len(system) * (len(reqs) - 1)
    off.runner = off_runner.runner


def test_greedy_identical_with_cache_on_and_off_token_for_token(core_on, core_off, ex):
    # Round 1 caches each example's prompt and 128 generated tokens; round 2 ("the next turn")
    # extends them, so it hits prompt blocks AND blocks the first round generated.
    first, want_first = continuations(ex, [0], 128)
    reqs, want = continuations(ex, [16, 40, 77], 40)
    hits_before = core_on.scheduler.prefix_cache_hits
    on = {**run(core_on, first), **run(core_on, reqs, stagger=2)}
    assert core_on.scheduler.prefix_cache_hits - hits_before > 0
    assert all(r.num_cached_tokens > 0 for r in reqs)
    first_off, _ = continuations(ex, [0], 128)
    reqs_off, _ = continuations(ex, [16, 40, 77], 40)
    off = {**run(core_off, first_off), **run(core_off, reqs_off, stagger=2)}
    assert {k: v.tokens for k, v in on.items()} == {k: v.tokens for k, v in off.items()}
    assert {k: on[k].tokens for k in want} == want and {k: on[k].tokens for k in want_first} == want_first


def test_cancels_return_blocks_to_baseline_and_leave_correct_cache(stories260k_dir, ex):
    core = build_core(stories260k_dir, prefix_caching=True, budget=48)
    bm = core.block_manager
    reqs, want = continuations(ex, [0, 20, 33], 24)
    for r in reqs:
        core.add(r)
    aborted = set()
    for step in range(400):
        if not core.has_work:
            break
        if step % 3 == 1:  # abort mid-prefill and mid-decode, some while their prefix is shared
            victim = next((rid for rid in sorted(core.requests) if rid not in aborted), None)
            if victim is not None and len(aborted) < len(reqs) // 2:
                core.abort(victim)
                aborted.add(victim)
        core.step()
        bm.check()
    assert not core.has_work and aborted
    assert bm.num_in_use_blocks == 0 and bm.num_free_blocks + bm.num_cached_blocks == bm.num_blocks
    # What the aborted requests left cached is right: the same requests again give the oracle.
    again, want = continuations(ex, [0, 20, 33], 24)
    results = run(core, again)
    assert {k: v.tokens for k, v in results.items()} == want
    assert core.scheduler.prefix_cache_hits > 0


def test_preemption_with_shared_blocks_gives_the_same_tokens(stories260k_dir, ex):
    # 20 blocks of 16 for requests of up to 8 + 77 + 48 tokens: they share prompt blocks and
    # preempt one another; recompute finds their (and their neighbours') blocks again.
    core = build_core(stories260k_dir, prefix_caching=True, num_blocks=20, budget=64)
    reqs, want = continuations(ex[:2], [0, 30, 77], 48)
    results = run(core, reqs)
    assert core.scheduler.num_preemptions > 0
    assert {k: v.tokens for k, v in results.items()} == want
