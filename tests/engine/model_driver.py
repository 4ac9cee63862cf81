"""A tiny test-side driver for the ModelRunner: allocates blocks and schedules prefill chunks and
decodes itself, so model-side tests need neither the engine core's scheduler nor its block manager."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import torch

from engine_svc.config import EngineConfig
from engine_svc.model_runner import ModelRunner
from engine_svc.sampling_params import SamplingParams
from engine_svc.step import SampledToken, ScheduledSeq


def interpreted_triton_runner_code(model_dir: pathlib.Path, max_num_batched_tokens: int) -> str:
    """Python source for a child process: a stories260k runner on the Triton kernels (attention and
    layer ops) as `r`, with model_driver importable. Finish it with the checks and print("ok")."""
    return f"""
import sys, pathlib, torch
sys.path.insert(0, {os.path.dirname(__file__)!r})
torch.set_num_threads(1)
from engine_svc.config import EngineConfig
from engine_svc.model_runner import ModelRunner
import model_driver
d = pathlib.Path({str(model_dir)!r})
r = ModelRunner(EngineConfig(model=str(d), dtype="float32", num_gpu_blocks_override=64,
                max_num_batched_tokens={max_num_batched_tokens}, max_num_seqs=4), attention_backend="triton",
                layer_ops="triton")
r.load_model(); r.allocate_kv_cache(r.determine_num_blocks()); r.warmup()
assert r.backend.name == "triton"
"""


def run_interpreted(code: str, timeout: float) -> None:
    """Run code in a child under Triton's CPU interpreter (TRITON_INTERPRET must be set before
    triton is imported); it must print "ok" last."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def make_runner(model: str, num_blocks: int = 256, **kw) -> ModelRunner:
    cfg = EngineConfig(model=str(model), device="cpu", dtype="float32", num_gpu_blocks_override=num_blocks, **kw)
    runner = ModelRunner(cfg)
    runner.load_model()
    runner.allocate_kv_cache(runner.determine_num_blocks())
    runner.warmup()
    return runner


class Req:
    def __init__(self, rid: str, prompt: list[int], params: SamplingParams, max_new: int):
        self.rid, self.prompt, self.params, self.max_new = rid, list(prompt), params, max_new
        self.output: list[int] = []
        self.records: list[SampledToken] = []
        self.num_computed = 0
        self.blocks: list[int] = []

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def done(self) -> bool:
        return len(self.output) >= self.max_new


def generate(runner: ModelRunner, prompts: list[list[int]], max_new: int = 64,
             params: SamplingParams | list[SamplingParams] | None = None, chunk: int | None = None,
             stagger: bool = False, preempt: dict[int, int] | None = None) -> list[list[int]]:
    """Run requests to max_new tokens each (no stop ids), in one batch.

    chunk: split prefills into chunks of at most this many tokens (chunked prefill).
    stagger: admit request i only at step i, so prefills mix with other requests' decodes.
    preempt: {step: request index}: before that step, the request loses its blocks and its computed
        tokens and is recomputed from prompt + output so far (preemption by recompute).
    Blocks come from a free list and go back when a request finishes, so tables are not contiguous.
    """
    plist = params if isinstance(params, list) else [params or SamplingParams(temperature=0.0)] * len(prompts)
    reqs = [Req(str(i), p, sp, max_new) for i, (p, sp) in enumerate(zip(prompts, plist))]
    free = list(range(runner.num_blocks))[::-1]
    bs = runner.block_size
    step = 0
    while not all(r.done for r in reqs):
        if preempt and step in preempt:
            victim = reqs[preempt[step]]
            free.extend(victim.blocks)
            victim.blocks, victim.num_computed = [], 0
        active = [r for i, r in enumerate(reqs) if not r.done and (not stagger or i <= step)]
        seqs = []
        for r in active:
            toks = r.tokens
            n = len(toks) - r.num_computed
            if chunk is not None:
                n = min(n, chunk)
            need = -(-(r.num_computed + n) // bs) - len(r.blocks)
            r.blocks += [free.pop() for _ in range(need)]
            new = toks[r.num_computed:r.num_computed + n]
            sample = r.num_computed + n == len(toks)
            seqs.append(ScheduledSeq(r.rid, new, r.num_computed, list(r.blocks), sample, r.params,
                                     r.prompt, list(r.output)))
        results = runner.execute(seqs)
        for r, s, res in zip(active, seqs, results):
            r.num_computed += len(s.new_token_ids)
            if res is not None:
                r.output.append(res.token_id)
                r.records.append(res)
                if r.done:
                    free.extend(r.blocks)
                    r.blocks = []
        step += 1
    generate.last_reqs = reqs
    return [r.output for r in reqs]


def prefill_logits(runner: ModelRunner, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Logits [len(prompt), vocab] for every prompt position, prompts batched in one step."""
    seqs, next_block = [], 0
    bs = runner.block_size
    for i, p in enumerate(prompts):
        nb = -(-len(p) // bs)
        seqs.append(ScheduledSeq(str(i), list(p), 0, list(range(next_block, next_block + nb)), False,
                                 SamplingParams(temperature=0.0), list(p), []))
        next_block += nb
    with torch.inference_mode():
        hidden = runner._forward(seqs)
        logits = runner.model.compute_logits(hidden)
    out, start = [], 0
    for p in prompts:
        out.append(logits[start:start + len(p)])
        start += len(p)
    return out


def greedy_examples(model_dir: pathlib.Path) -> list[dict]:
    with open(model_dir / "greedy_examples.json") as f:
        data = json.load(f)
    return data["examples"] if isinstance(data, dict) else data


def one_thread():
    """Tiny models run fastest on one thread, and CI's 2 cores are shared with other test workers."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
