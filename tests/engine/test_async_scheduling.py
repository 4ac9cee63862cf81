"""Async scheduling (step N+1 scheduled and launched before step N is collected) changes nothing a
client sees: the same tokens, finish reasons and stop ids as the synchronous engine, with chunked
prefill, preemption, seeds, stop ids, max_tokens and aborts of requests whose step is in flight.

Runs the real EngineCore and ModelRunner (stories260k, fp32, CPU), where the overlap has nothing to
hide but every path of it runs: placeholders, decode inputs taken from the previous step's sampled
ids on the device, one-step-late stops with the extra token discarded, rows dropped mid-flight.
"""

from __future__ import annotations

import asyncio

import pytest
from engine_driver import build_core, examples, greedy, one_torch_thread, run

from engine_svc.config import EngineConfig
from engine_svc.core.request import FinishReason, Request
from engine_svc.engine_loop import EngineLoop
from engine_svc.sampling_params import SamplingParams

_threads = pytest.fixture(autouse=True, scope="module")(one_torch_thread)


@pytest.fixture(scope="module")
def ex(stories260k_dir):
    return examples(stories260k_dir)


def workload(ex) -> list[Request]:
    """Greedy with staggered lengths, stop ids, seeded sampling and a penalty, interleaved."""
    reqs = []
    for i, e in enumerate(ex):
        p = e["prompt_ids"]
        reqs.append(greedy(f"g{i}", p, 40 + 7 * i, ignore_eos=True))
        reqs.append(greedy(f"s{i}", p, 100, stop_token_ids=[e["expected_ids"][9 + i]]))
        reqs.append(Request(f"r{i}", list(p), SamplingParams(temperature=0.9, top_p=0.95, seed=i, max_tokens=33)))
        reqs.append(Request(f"p{i}", list(p), SamplingParams(temperature=0.0, repetition_penalty=1.3,
                                                            max_tokens=21, ignore_eos=True)))
    return reqs


def outcome(results) -> dict:
    return {rid: (r.tokens, r.finish_reason, r.stop_token_id) for rid, r in results.items()}


@pytest.mark.parametrize("num_blocks,budget", [(None, 64), (14, 16)])
def test_async_matches_sync(stories260k_dir, ex, num_blocks, budget):
    """(14 blocks, budget 16): chunked prefills and preemptions while steps are in flight."""
    got = {}
    for overlap in (False, True):
        core = build_core(stories260k_dir, num_blocks=num_blocks, budget=budget, max_num_seqs=8,
                          async_scheduling=overlap)
        assert core.async_scheduling is overlap
        got[overlap] = outcome(run(core, workload(ex), stagger=2))
        if num_blocks:
            assert core.scheduler.num_preemptions >= 3
    assert got[True] == got[False]
    for i, e in enumerate(ex):
        assert got[True][f"g{i}"][0] == e["expected_ids"][:40 + 7 * i]
        tokens, reason, stop = got[True][f"s{i}"]
        assert (reason, stop) == (FinishReason.STOP_TOKEN, e["expected_ids"][9 + i])
        assert tokens == e["expected_ids"][:tokens.index(stop) + 1]


def test_abort_while_its_step_is_in_flight(stories260k_dir, ex):
    core = build_core(stories260k_dir, async_scheduling=True)
    bm = core.block_manager
    prompt = ex[0]["prompt_ids"]
    for rid in "abc":
        core.add(greedy(rid, prompt, 50, ignore_eos=True))
    seen = {rid: [] for rid in "abc"}
    for _ in range(6):
        for out in core.step():
            seen[out.request_id] += [t.token_id for t in out.tokens]
    assert core._inflight is not None and any(r.request_id == "b" for r in core._inflight.sched.requests)
    aborted = core.abort("b")
    assert aborted.finished and aborted.finish_reason is FinishReason.CANCELLED
    core.add(greedy("b", prompt, 5, ignore_eos=True))  # the id is free again at once
    seen["b"] = []
    while core.has_work:
        for out in core.step():
            seen[out.request_id] += [t.token_id for t in out.tokens]
        bm.check()
    assert seen["a"] == seen["c"] == ex[0]["expected_ids"][:50]
    assert seen["b"] == ex[0]["expected_ids"][:5]  # nothing of the aborted "b" leaked into the new one
    assert bm.num_in_use_blocks == 0 and bm.num_free_blocks + bm.num_cached_blocks == bm.num_blocks


async def _drain(queue) -> tuple[list[int], FinishReason]:
    tokens = []
    while True:
        out = await queue.get()
        tokens += [t.token_id for t in out.tokens]
        if out.finished:
            return tokens, out.finish_reason


async def test_engine_loop_streams_and_aborts_with_overlap(stories260k_dir, ex):
    """The engine thread with async scheduling on: streams, an abort mid-generation, blocks back."""
    cfg = EngineConfig(model=str(stories260k_dir), device="cpu", dtype="float32", max_num_batched_tokens=64,
                       num_gpu_blocks_override=64, async_scheduling=True)
    loop = EngineLoop(cfg)
    await loop.start()
    try:
        prompt = ex[1]["prompt_ids"]
        a = loop.add(greedy("a", prompt, 60, ignore_eos=True))
        b = loop.add(greedy("b", prompt, 400, ignore_eos=True))
        first = await b.get()
        assert first.tokens
        loop.abort("b")
        (tokens_a, reason_a), (_, reason_b) = await asyncio.gather(_drain(a), _drain(b))
        assert tokens_a == ex[1]["expected_ids"][:60] and reason_a is FinishReason.LENGTH
        assert reason_b is FinishReason.CANCELLED
        assert await loop.wait_idle(10)
        assert loop.load.in_use_blocks == 0 and loop.num_live == 0
    finally:
        await loop.stop()
