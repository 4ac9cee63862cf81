"""A steady decode step reaches the block manager only for what changed: requests entering a new
block (one allocation each) and, with prefix caching, requests that filled one (one cache_blocks
each); the load figures need no pass over the running requests' tables. Counted calls, not time
(bench/core_step.py measures the time)."""

from __future__ import annotations

import pytest

from engine_svc.core.engine_core import EngineCore
from engine_svc.core.request import Request
from engine_svc.sampling_params import SamplingParams
from engine_svc.step import SampledToken

BS = 4


class _Ready:
    def __init__(self, results):
        self._results = results

    def result(self):
        return self._results


class InstantRunner:
    """launch(plan) -> every sampled row gets token 5 at once."""

    def launch(self, plan):
        return _Ready([SampledToken(5) if s else None for s in plan.sample])


class Counting:
    """Wraps one method of an object and counts its calls, with the request ids they named."""

    def __init__(self, obj, name: str):
        self.calls: list[str] = []
        inner = getattr(obj, name)

        def counted(request_id, *args, **kwargs):
            self.calls.append(request_id)
            return inner(request_id, *args, **kwargs)

        setattr(obj, name, counted)


@pytest.mark.parametrize("prefix", [False, True])
def test_steady_decode_calls_the_block_manager_only_for_block_boundaries(prefix):
    core = EngineCore(InstantRunner(), num_blocks=256, block_size=BS, eos_token_ids=[2], max_model_len=512,
                      max_num_batched_tokens=256, max_num_seqs=16, enable_prefix_caching=prefix,
                      async_scheduling=True)
    reqs = [Request(f"r{i}", list(range(10 + i, 10 + i + 5 + i)), SamplingParams(max_tokens=100, ignore_eos=True))
            for i in range(8)]  # prompts of 5..12 tokens: rows cross block boundaries on different steps
    for r in reqs:
        core.add(r)
    while any(r.num_output_tokens < 2 for r in reqs):
        core.step()
    bm, sched = core.block_manager, core.scheduler
    allocs, caches = Counting(bm, "allocate"), Counting(bm, "cache_blocks")
    needed = Counting(bm, "num_blocks_needed")  # once per request in the load and admission sums before
    hashed = Counting(bm, "num_hashed")  # once per request when every step looked for filled blocks
    num_entering = num_filled = 0
    for _ in range(3 * BS):
        # What this step must touch: rows whose next token opens a block; rows whose known and
        # computed tokens filled one since (made findable at the start of this schedule()).
        entering = {r.request_id for r in reqs if r.num_computed_tokens % BS == 0}
        filled = {r.request_id for r in reqs
                  if min(r.num_computed_tokens, r.num_tokens) // BS > r.hashed_up_to // BS} if prefix else set()
        allocs.calls.clear(), caches.calls.clear(), needed.calls.clear(), hashed.calls.clear()
        core.step()
        core.load()
        assert set(allocs.calls) == entering and len(allocs.calls) == len(entering)
        assert set(caches.calls) == filled and len(caches.calls) == len(filled)
        assert sorted(needed.calls) == sorted(allocs.calls)  # only allocate's own
        assert hashed.calls == []
        sched.check_totals()
        num_entering += len(entering)
        num_filled += len(filled)
    assert num_entering == 3 * len(reqs)  # every row entered a block once every BS steps
    assert num_filled == (3 * len(reqs) if prefix else 0)
