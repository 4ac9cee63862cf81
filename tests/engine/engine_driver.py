"""Test helpers for the engine core tests: a real ModelRunner behind an EngineCore, driven in-thread."""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass, field

import torch

from engine_svc.config import EngineConfig
from engine_svc.core.engine_core import EngineCore
from engine_svc.core.request import FinishReason, Request
from engine_svc.engine_loop import build_engine_core
from engine_svc.sampling_params import SamplingParams

GREEDY = dict(temperature=0.0)


def build_core(model: str | pathlib.Path, *, block_size: int = 16, num_blocks: int | None = None,
               chunked: bool = True, budget: int = 512, max_num_seqs: int = 64,
               max_model_len: int | None = None, prefix_caching: bool = True,
               async_scheduling: bool | None = None) -> EngineCore:
    """A real stories260k/demo runner (fp32, CPU) behind an EngineCore, sized small for tests."""
    cfg = EngineConfig(model=str(model), device="cpu", dtype="float32", block_size=block_size,
                       max_num_batched_tokens=budget, max_num_seqs=max_num_seqs,
                       enable_chunked_prefill=chunked, num_gpu_blocks_override=num_blocks,
                       kv_cache_memory=8 << 20, max_model_len=max_model_len,
                       enable_prefix_caching=prefix_caching, async_scheduling=async_scheduling).validate()
    core, _ = build_engine_core(cfg)
    return core


def one_torch_thread():
    """Fixture body: tiny models run fastest on one thread, and CI's 2 cores are shared."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@dataclass
class Result:
    tokens: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_token_id: int | None = None


def run(core: EngineCore, requests: list[Request], stagger: int = 0) -> dict[str, Result]:
    """Add the requests (request i before step i * stagger; all at once with 0) and step until every
    one finished; check the block accounting after every step."""
    results = {r.request_id: Result() for r in requests}
    pending = list(requests)
    bm = core.block_manager
    for step in range(100_000):
        while pending and step >= (len(requests) - len(pending)) * stagger:
            core.add(pending.pop(0))
        if not core.has_work and not pending:
            break
        for out in core.step():
            res = results[out.request_id]
            assert out.first_index == len(res.tokens)
            res.tokens += [t.token_id for t in out.tokens]
            if out.finished:
                res.finish_reason, res.stop_token_id = out.finish_reason, out.stop_token_id
        bm.check()
    assert not core.has_work
    # Nothing in use; finished requests' full blocks may stay cached (evictable) under prefix caching.
    assert bm.num_in_use_blocks == 0 and bm.num_free_blocks + bm.num_cached_blocks == bm.num_blocks, \
        "blocks leaked"
    return results


def greedy(rid: str, prompt: list[int], max_tokens: int, **kw) -> Request:
    return Request(rid, list(prompt), SamplingParams(**GREEDY, max_tokens=max_tokens, **kw))


def examples(model_dir: pathlib.Path) -> list[dict]:
    data = json.loads((model_dir / "greedy_examples.json").read_text())
    return data["examples"] if isinstance(data, dict) else data
