"""The model cut into pieces at the attention calls (what the piecewise CUDA graphs capture) is the
same forward: on the CPU the pieces run eagerly, padded to their token buckets like a replay."""

from __future__ import annotations

import pytest
import torch
from model_driver import generate, greedy_examples, make_runner, prefill_logits

from engine_svc.piecewise_graphs import MIXED_GRAPH_TOKENS, PiecewiseGraphs


@pytest.fixture(scope="module")
def runner(stories260k_dir):
    return make_runner(stories260k_dir, block_size=8, max_num_batched_tokens=256)


def use_pieces(runner, on: bool) -> None:
    d = runner.buffers.dev
    runner.pieces = PiecewiseGraphs(runner.model, d.ids, d.pos, 256, capture=False) if on else None


def test_buckets_cover_every_step_size_up_to_the_largest():
    pieces_sizes = [b for b in MIXED_GRAPH_TOKENS if b <= 256]
    assert pieces_sizes == sorted(pieces_sizes) and pieces_sizes[-1] == 256


def test_pieces_give_the_forward_logits(runner, stories260k_dir):
    prompts = [e["prompt_ids"] for e in greedy_examples(stories260k_dir)] + [[1, 5, 9]]
    use_pieces(runner, False)
    whole = prefill_logits(runner, prompts)
    use_pieces(runner, True)
    try:
        assert runner.pieces.size_for(sum(map(len, prompts))) > sum(map(len, prompts))  # padded
        pieces = prefill_logits(runner, prompts)
    finally:
        use_pieces(runner, False)
    for a, b in zip(whole, pieces):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_mixed_steps_through_pieces_generate_the_same_tokens(runner, stories260k_dir):
    ex = greedy_examples(stories260k_dir)
    prompts = [e["prompt_ids"] for e in ex]
    use_pieces(runner, True)
    try:
        outs = generate(runner, prompts, max_new=24, chunk=5, stagger=True)  # chunked + staggered: mixed
    finally:
        use_pieces(runner, False)
    assert outs == [e["expected_ids"][:24] for e in ex]


def test_steps_beyond_the_largest_bucket_run_eagerly(runner):
    use_pieces(runner, True)
    try:
        assert runner.pieces.size_for(257) is None and runner.pieces.size_for(1) == 64
    finally:
        use_pieces(runner, False)
