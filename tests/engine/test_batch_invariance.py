"""Batch invariance through the real engine core and stories260k in fp32.

The oracle is greedy_examples.json (llama2.c's own greedy ids, which HF generate reproduces): every
way of batching, chunking, paging and preempting must give exactly those ids.
"""

from __future__ import annotations

import pytest
from engine_driver import build_core, examples, greedy, one_torch_thread, run

from engine_svc.core.request import FinishReason


_threads = pytest.fixture(autouse=True, scope="module")(one_torch_thread)


@pytest.fixture(scope="module")
def ex(stories260k_dir):
    return examples(stories260k_dir)


@pytest.fixture(scope="module")
def core(stories260k_dir):
    return build_core(stories260k_dir)


def mixed(ex, copies: int, max_tokens: int) -> tuple[list, dict[str, list[int]]]:
    """copies x each example, interleaved; returns (requests, expected ids by request id)."""
    reqs, want = [], {}
    for c in range(copies):
        for i, e in enumerate(ex):
            rid = f"{i}-{c}"
            reqs.append(greedy(rid, e["prompt_ids"], max_tokens, ignore_eos=True))
            want[rid] = e["expected_ids"][:max_tokens]
    return reqs, want


def test_16_identical_concurrent_requests_identical_tokens(core, ex):
    e = ex[1]
    results = run(core, [greedy(f"same-{i}", e["prompt_ids"], 128, ignore_eos=True) for i in range(16)])
    outs = {tuple(r.tokens) for r in results.values()}
    assert len(outs) == 1
    assert list(outs.pop()) == e["expected_ids"]
    assert all(r.finish_reason is FinishReason.LENGTH for r in results.values())


def test_greedy_examples_reproduced_mixed_and_staggered(core, ex):
    reqs, want = mixed(ex, copies=2, max_tokens=128)
    results = run(core, reqs, stagger=5)  # later requests join a running batch mid-decode
    assert {rid: r.tokens for rid, r in results.items()} == want


def test_generation_stops_where_generation_config_says(core, ex):
    """eos ids [2, 1]: the model ends a story with BOS (1); generation stops there, token included."""
    results = run(core, [greedy(str(i), e["prompt_ids"], 400) for i, e in enumerate(ex)])
    for i, e in enumerate(ex):
        r = results[str(i)]
        stop_at = e["index_of_first_bos_in_continuation"]
        assert r.tokens[:128] == e["expected_ids"]
        assert len(r.tokens) == stop_at + 1 and r.tokens[-1] == 1
        assert not {1, 2} & set(r.tokens[:-1])
        assert (r.finish_reason, r.stop_token_id) == (FinishReason.STOP_TOKEN, 1)


@pytest.mark.parametrize("chunked,budget", [(True, 7), (False, 512)])
def test_chunked_prefill_on_and_off(stories260k_dir, ex, chunked, budget):
    core = build_core(stories260k_dir, chunked=chunked, budget=budget)
    reqs, want = mixed(ex, copies=2, max_tokens=64)
    results = run(core, reqs, stagger=2)
    assert {rid: r.tokens for rid, r in results.items()} == want


@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_block_sizes(stories260k_dir, ex, block_size):
    core = build_core(stories260k_dir, block_size=block_size)
    reqs, want = mixed(ex, copies=2, max_tokens=128)
    results = run(core, reqs, stagger=3)
    assert {rid: r.tokens for rid, r in results.items()} == want


def test_forced_preemption(stories260k_dir, ex):
    # 16 requests of up to 16 + 64 tokens need up to 5 blocks of 16 each (~75 in all); give 24.
    core = build_core(stories260k_dir, num_blocks=24)
    reqs, want = mixed(ex, copies=6, max_tokens=64)
    reqs, want = reqs[:16], {r.request_id: want[r.request_id] for r in reqs[:16]}
    results = run(core, reqs)
    assert core.scheduler.num_preemptions >= 5
    assert {rid: r.tokens for rid, r in results.items()} == want
