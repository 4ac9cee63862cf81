"""Mixed steps as a CUDA graph replays them: tokens padded to the graph's size, every buffer row
present (the rows past the step's sequences have no tokens), the one-token rows listed for the
decode tiles. On the CPU the same padded step runs eagerly (MixedGraph(capture=False)), through the
torch backend and, in a child process, through the Triton kernels in Triton's interpreter."""

from __future__ import annotations

import model_driver
import pytest
from model_driver import generate, greedy_examples, make_runner

from engine_svc.cuda_graphs import MIXED_GRAPH_TOKENS, MixedGraph


def use_mixed_graphs(runner, sizes) -> None:
    """Give the runner uncaptured mixed graphs of these sizes ([]: none)."""
    runner.mixed_graphs = {t: MixedGraph(runner.model, runner.kv_caches, runner.backend, runner.buffers, t,
                                         runner.graph_rows, runner.max_model_len, capture=False) for t in sizes}
    runner.mixed_sizes = sorted(runner.mixed_graphs)


@pytest.fixture(scope="module")
def runner(stories260k_dir):
    return make_runner(stories260k_dir, block_size=8, max_num_batched_tokens=256, max_num_seqs=8)


def test_sizes_are_increasing_multiples_of_64():
    assert MIXED_GRAPH_TOKENS == sorted(MIXED_GRAPH_TOKENS) and all(t % 64 == 0 for t in MIXED_GRAPH_TOKENS)


def test_padded_mixed_steps_generate_the_greedy_examples(runner, stories260k_dir):
    ex = greedy_examples(stories260k_dir)
    use_mixed_graphs(runner, [64, 128, 256])
    try:
        # chunked and staggered: steps mix prefill chunks with decode tokens; 3 sequences in 9 rows
        outs = generate(runner, [e["prompt_ids"] for e in ex], max_new=24, chunk=5, stagger=True)
        packed_rows = runner.buffers.dev.qsl.shape[0] - 1
    finally:
        use_mixed_graphs(runner, [])
    assert outs == [e["expected_ids"][:24] for e in ex]
    assert packed_rows == runner.graph_rows == 9


def test_padded_mixed_steps_through_the_triton_kernels(stories260k_dir):
    """The Triton attention over padded rows and listed singles (what the graph captures), run by
    Triton's CPU interpreter in a subprocess (TRITON_INTERPRET must be set before triton loads)."""
    code = model_driver.interpreted_triton_runner_code(stories260k_dir, 64) + """
import test_mixed_graphs
test_mixed_graphs.use_mixed_graphs(r, [64])
ex = model_driver.greedy_examples(d)[:2]
outs = model_driver.generate(r, [e["prompt_ids"] for e in ex], max_new=3, chunk=6, stagger=True)
assert outs == [e["expected_ids"][:3] for e in ex], outs
print("ok")
"""
    model_driver.run_interpreted(code, timeout=300)


@pytest.mark.parametrize("eager_from_offset,replays", [(0, 7), (1, 8)])
def test_long_chunks_only_steps_run_eagerly(runner, stories260k_dir, monkeypatch, eager_from_offset, replays):
    """A step the backend says runs eagerly (here: chunks only, of at least a threshold, as the Triton
    backend's runs_eagerly) does; a shorter one, and every step with a one-token row, replays a
    mixed-step graph. The tokens are the same either way."""
    ex = greedy_examples(stories260k_dir)
    prompts = [e["prompt_ids"] for e in ex]
    first_step = sum(map(len, prompts))  # all prompts at once, unchunked: the one chunks-only step
    assert first_step <= 256
    eager_from = first_step + eager_from_offset
    monkeypatch.setattr(runner.backend, "runs_eagerly", lambda tokens, lens: tokens >= eager_from and min(lens) > 1)
    use_mixed_graphs(runner, [64, 128, 256])
    calls = []
    for graph in runner.mixed_graphs.values():
        monkeypatch.setattr(graph, "replay", lambda replay=graph.replay: calls.append(1) or replay())
    try:
        outs = generate(runner, prompts, max_new=8)  # one prefill step, then 7 decode steps
    finally:
        use_mixed_graphs(runner, [])
    assert outs == [e["expected_ids"][:8] for e in ex]
    assert len(calls) == replays
