"""Pure-decode steps as the CUDA graphs replay them: padded to the graph's batch size, over the
full-width block table, through the graph planned for the batch's longest sequence (cuda_graphs.py's
DecodeGraphs). On the CPU the same padded steps run eagerly (DecodeGraph(capture=False)), through the
torch backend and, in a child process, through the Triton kernels in Triton's interpreter."""

from __future__ import annotations

import model_driver
import pytest
from model_driver import generate, greedy_examples, make_runner

from engine_svc.cuda_graphs import DecodeGraph, DecodeGraphs


def use_decode_graphs(runner, sizes, lengths) -> dict:
    """Give the runner uncaptured decode graphs of these batch sizes, each at these lengths ([]: none);
    returns {(batch size, length): replays so far}, counted as the runner replays them."""
    replays: dict = {}
    graphs = []
    for b in sizes:
        for n in lengths:
            g = DecodeGraph(runner.model, runner.kv_caches, runner.backend, runner.buffers, b, n, capture=False)
            replays[b, n] = 0

            def counted(g=g, run=g.replay):
                replays[g.batch_size, g.max_seq_len] += 1
                return run()
            g.replay = counted
            graphs.append(g)
    runner.graphs = DecodeGraphs(graphs)
    return replays


@pytest.fixture(scope="module")
def runner(stories260k_dir):
    return make_runner(stories260k_dir, block_size=8, max_num_seqs=8)


def test_graph_choice_by_batch_size_and_longest_sequence():
    class Planned:  # what DecodeGraphs reads of a graph
        def __init__(self, batch_size, max_seq_len):
            self.batch_size, self.max_seq_len = batch_size, max_seq_len

    graphs = DecodeGraphs([Planned(b, n) for b in (1, 4, 8) for n in (255, 4096)] + [Planned(16, 4096)])
    assert graphs and len(graphs) == 7 and graphs.sizes == [1, 4, 8, 16]
    assert [graphs.batch_size_for(n) for n in (1, 2, 4, 5, 16, 17)] == [1, 4, 4, 8, 16, None]
    assert graphs.graph(4, 1).max_seq_len == graphs.graph(4, 255).max_seq_len == 255
    assert graphs.graph(4, 256).max_seq_len == graphs.graph(4, 4096).max_seq_len == 4096
    assert graphs.graph(16, 3).max_seq_len == 4096
    assert not DecodeGraphs([]) and DecodeGraphs([]).batch_size_for(1) is None


def test_padded_decode_steps_switch_graphs_as_contexts_grow(runner, stories260k_dir):
    ex = greedy_examples(stories260k_dir)
    # prompts of 6, 15 and 16 tokens and 24 new ones: the longest sequence passes 32 positions
    replays = use_decode_graphs(runner, [2, 4], [32, runner.max_model_len])
    try:
        outs = generate(runner, [e["prompt_ids"] for e in ex], max_new=24)
    finally:
        runner.graphs = DecodeGraphs([])
    assert outs == [e["expected_ids"][:24] for e in ex]
    # 3 sequences pad to the 4-graph: the short one while the longest fits 32, then the limit's
    assert replays[4, 32] > 0 and replays[4, runner.max_model_len] > 0 and replays[2, 32] == 0
    assert sum(replays.values()) == 23  # every decode step replayed a graph (the first token is prefill)


def test_padded_decode_steps_through_the_triton_kernels(stories260k_dir):
    """The Triton attention over a padded decode batch and the full-width table, under graphs of two
    lengths, run by Triton's CPU interpreter in a subprocess (TRITON_INTERPRET is set before triton
    loads)."""
    code = model_driver.interpreted_triton_runner_code(stories260k_dir, 64) + """
import test_decode_graphs
replays = test_decode_graphs.use_decode_graphs(r, [4], [20, r.max_model_len])
ex = model_driver.greedy_examples(d)[:2]
outs = model_driver.generate(r, [e["prompt_ids"] for e in ex], max_new=8)
assert outs == [e["expected_ids"][:8] for e in ex], outs
assert replays[4, 20] > 0 and replays[4, r.max_model_len] > 0, replays
print("ok")
"""
    model_driver.run_interpreted(code, timeout=300)
