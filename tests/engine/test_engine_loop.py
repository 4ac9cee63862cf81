"""The threaded engine loop: the event loop stays responsive during model steps, a step's outputs
arrive in one batch, and a failing step ends the live requests (blocks freed) but not the engine."""

from __future__ import annotations

import asyncio
import time

import pytest
import pytest_asyncio

from engine_driver import one_torch_thread

from engine_svc.config import EngineConfig
from engine_svc.core.request import ErrorKind, FinishReason, Request
from engine_svc.engine_loop import AbortResult, DuplicateRequest, EngineLoop
from engine_svc.model_runner import ModelRunner
from engine_svc.sampling_params import SamplingParams

STEP_S = 0.05
POISON = 13  # a prompt holding this id makes SlowRunner's step fail

pytestmark = pytest.mark.asyncio(loop_scope="module")


class SlowRunner(ModelRunner):
    """The real runner, with a sleep per step (a stand-in for a long GPU step) and a poison id."""

    def launch(self, plan):
        time.sleep(STEP_S)
        if any(POISON in s.prompt_token_ids for s in plan.new_seqs):
            raise RuntimeError("injected step failure")
        return super().launch(plan)


_threads = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(stories260k_dir):
    cfg = EngineConfig(model=str(stories260k_dir), device="cpu", dtype="float32", max_num_batched_tokens=128,
                       num_gpu_blocks_override=64)
    loop = EngineLoop(cfg, runner_factory=SlowRunner)
    await loop.start()
    yield loop
    await loop.stop()


def greedy(rid: str, prompt: list[int], n: int) -> Request:
    return Request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))


async def drain(queue) -> list:
    outs = []
    while not outs or not outs[-1].finished:
        outs.append(await queue.get())
    return outs


async def test_event_loop_never_blocked_by_a_step(engine):
    gaps = []

    async def ticker(stop: asyncio.Event):
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.002)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    stop = asyncio.Event()
    tick = asyncio.create_task(ticker(stop))
    outs = await drain(engine.add(greedy("r", [1, 20, 30], 8)))
    stop.set()
    await tick
    assert sum(len(o.tokens) for o in outs) == 8
    assert len(gaps) > 8 * STEP_S / 0.01  # the ticker kept running through 8 steps of 50 ms
    # Blocked by steps, the ticker would see a gap of >= one step per step (8 or more); allow one
    # stall from a busy host.
    assert sum(g >= STEP_S * 0.9 for g in gaps) <= 1, sorted(gaps)[-3:]


async def test_one_delivery_per_step_carries_every_request(engine):
    batches = []
    real = engine._deliver

    def spy(outputs, load):
        batches.append([o.request_id for o in outputs])
        real(outputs, load)

    engine._deliver = spy
    queues = [engine.add(greedy(f"r{i}", [1, 40 + i], 6)) for i in range(4)]
    results = await asyncio.gather(*[drain(q) for q in queues])
    assert all(sum(len(o.tokens) for o in outs) == 6 for outs in results)
    full = [b for b in batches if sorted(b) == ["r0", "r1", "r2", "r3"]]
    assert len(full) >= 4  # decode steps deliver all four requests' tokens together
    assert len(batches) <= 10  # about 6 steps (+ command wake-ups), not one callback per token (24)


async def test_failed_step_ends_live_requests_and_engine_keeps_serving(engine):
    ok = engine.add(greedy("ok", [1, 50], 200))
    await ok.get()
    bad = engine.add(greedy("bad", [1, POISON], 4))
    bad_outs, ok_outs = await drain(bad), await drain(ok)
    for outs in (bad_outs, ok_outs):
        assert outs[-1].finish_reason is FinishReason.ERROR and outs[-1].error_kind is ErrorKind.INTERNAL
    # The outputs and the load snapshot after the failed step arrive in one delivery.
    assert engine.load.free_blocks == 64 and engine.num_live == 0
    outs = await drain(engine.add(greedy("after", [1, 50], 3)))
    assert outs[-1].finish_reason is FinishReason.LENGTH


async def test_duplicates_and_abort_results(engine):
    q = engine.add(greedy("x", [1, 60], 500))
    with pytest.raises(DuplicateRequest):
        engine.add(greedy("x", [1, 60], 5))
    await q.get()
    assert engine.abort("x") is AbortResult.ABORTED
    outs = await drain(q)
    assert outs[-1].finish_reason is FinishReason.CANCELLED
    assert engine.abort("x") is AbortResult.ALREADY_FINISHED
    assert engine.abort("y") is AbortResult.NOT_FOUND
