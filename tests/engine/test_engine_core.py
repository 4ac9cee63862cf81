"""EngineCore stop conditions and aborts, with a runner that returns scripted tokens.

The order of checks (engine_core.py): stop ids / EOS after min_tokens, then max_tokens, then
max_model_len. The real-model versions of these paths run in test_batch_invariance.py.
"""

from __future__ import annotations

from engine_svc.core.engine_core import EngineCore
from engine_svc.core.request import FinishReason, Request
from engine_svc.sampling_params import SamplingParams
from engine_svc.step import SampledToken


class Scripted:
    """Every sampled row gets the next token of its request's script."""

    def __init__(self, scripts: dict[str, list[int]]):
        self.scripts = scripts

    def execute(self, seqs):
        return [SampledToken(self.scripts[s.request_id][len(s.output_token_ids)]) if s.sample else None
                for s in seqs]


def finish(scripts, max_model_len=64, **params) -> dict[str, tuple]:
    core = EngineCore(Scripted(scripts), num_blocks=32, block_size=4, eos_token_ids=[2, 1],
                      max_model_len=max_model_len, max_num_batched_tokens=32, max_num_seqs=8)
    for rid in scripts:
        core.add(Request(rid, [3, 4, 5, 6], SamplingParams(temperature=0.0, **params)))
    got = {rid: [] for rid in scripts}
    ends = {}
    while core.has_work:
        for out in core.step():
            got[out.request_id] += [t.token_id for t in out.tokens]
            if out.finished:
                ends[out.request_id] = (got[out.request_id], out.finish_reason, out.stop_token_id,
                                        out.num_output_tokens)
    assert core.block_manager.num_free_blocks == 32
    return ends


def test_every_eos_id_stops_and_is_included():
    ends = finish({"a": [7, 2, 8, 8], "b": [7, 7, 1, 8]}, max_tokens=4)
    assert ends["a"] == ([7, 2], FinishReason.STOP_TOKEN, 2, 2)
    assert ends["b"] == ([7, 7, 1], FinishReason.STOP_TOKEN, 1, 3)


def test_ignore_eos_keeps_going_but_stop_ids_still_stop():
    ends = finish({"a": [2, 1, 9, 8, 8]}, max_tokens=5, ignore_eos=True, stop_token_ids=[9])
    assert ends["a"] == ([2, 1, 9], FinishReason.STOP_TOKEN, 9, 3)


def test_min_tokens_defers_stops():
    ends = finish({"a": [2, 9, 2, 8, 8]}, max_tokens=5, min_tokens=2, stop_token_ids=[9])
    assert ends["a"] == ([2, 9, 2], FinishReason.STOP_TOKEN, 2, 3)  # index 2 is the first that may stop


def test_max_tokens_and_max_model_len():
    assert finish({"a": [7] * 10}, max_tokens=3)["a"] == ([7, 7, 7], FinishReason.LENGTH, None, 3)
    # prompt 4 + 2 generated = max_model_len 6
    assert finish({"a": [7] * 10}, max_model_len=6, max_tokens=10)["a"] == ([7, 7], FinishReason.LENGTH, None, 2)


def test_abort_waiting_and_running_frees_everything():
    core = EngineCore(Scripted({"a": [7] * 50, "b": [7] * 50}), num_blocks=4, block_size=4,
                      eos_token_ids=[2], max_model_len=64, max_num_batched_tokens=4, max_num_seqs=8)
    core.add(Request("a", [3] * 4, SamplingParams(max_tokens=40)))
    core.add(Request("b", [3] * 4, SamplingParams(max_tokens=40)))
    core.step()  # a prefilled (budget 4), b still waiting
    assert [r.request_id for r in core.scheduler.waiting] == ["b"]
    out_b = core.abort("b")
    out_a = core.abort("a")
    assert (out_b.finished, out_b.finish_reason, out_b.tokens) == (True, FinishReason.CANCELLED, [])
    assert (out_a.finish_reason, out_a.num_output_tokens) == (FinishReason.CANCELLED, 1)
    assert core.abort("a") is None and not core.has_work
    assert core.block_manager.num_free_blocks == 4
