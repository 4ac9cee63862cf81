"""Continuous batching vs static batching on the same engine, same process, same workload.

    python bench/batching.py                                   # CPU, stories260k (or --model demo)
    python bench/batching.py --device cuda --model bench/configs/llama3-8b --load-format dummy

Workload: --num-requests requests with prompt and output lengths drawn log-uniformly from the given
ranges (a long tail, as real traffic has), random prompt ids, greedy, ignore_eos so each request
generates exactly its own output length. All requests are queued at t=0 (offline throughput).

Modes, each run once on the same EngineCore (same runner, same KV cache, same limits):
- continuous: every request is queued at once; the scheduler keeps up to --max-num-seqs running and
  admits a waiting request as soon as one finishes (the engine's normal operation).
- static: HF `generate` style. Take the next --max-num-seqs requests, run the batch until its
  longest member is done (every member generates the batch's longest output length, as one
  `max_new_tokens` per batch does), then take the next batch. Tokens past a request's own output
  length are computed but not useful.
- static_early_exit: as static, but finished members leave the batch (our engine frees them); the
  next batch still waits for the whole batch. Shows how much of the gap is padding vs waiting.

Useful tokens/s = sum of each request's own output length / wall time of the mode.
Writes JSON (device, date, git commit, config, workload, per-mode results, ratios) to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from engine_svc.config import EngineConfig  # noqa: E402
from engine_svc.core.engine_core import EngineCore  # noqa: E402
from engine_svc.core.hooks import EngineHooks, StepInfo  # noqa: E402
from engine_svc.core.request import Request  # noqa: E402
from engine_svc.engine_loop import build_engine_core  # noqa: E402
from engine_svc.sampling_params import SamplingParams  # noqa: E402
from bench.provenance import cpu_name, git_commit  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORIES260K = os.path.join(os.path.dirname(REPO), "shared", "models", "stories260k")
# Per-device defaults: CPU runs in about a minute; CUDA is sized to fill a batch of 256.
DEFAULTS = {
    "cpu": dict(num_requests=96, max_num_seqs=16, max_num_batched_tokens=512, prompt_len=(8, 96),
                output_len=(8, 256), max_model_len=None),
    # max_model_len 4096: the workload needs 2048; the model's own limit (131072 for Llama 3.1)
    # would only widen block tables and CUDA-graph buffers.
    "cuda": dict(num_requests=1024, max_num_seqs=256, max_num_batched_tokens=8192, prompt_len=(32, 1024),
                 output_len=(16, 1024), max_model_len=4096),
}


class StepStats(EngineHooks):
    def __init__(self):
        self.steps = 0
        self.seqs = 0
        self.tokens = 0

    def on_step(self, info: StepInfo) -> None:
        self.steps += 1
        self.seqs += info.num_seqs
        self.tokens += info.num_batched_tokens


def log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


def workload(n: int, prompt_len: tuple[int, int], output_len: tuple[int, int], vocab: int,
             seed: int) -> list[tuple[list[int], int]]:
    """[(prompt ids, output length)], deterministic in seed."""
    rng = random.Random(seed)
    return [([rng.randrange(3, vocab) for _ in range(log_uniform(rng, *prompt_len))],
             log_uniform(rng, *output_len)) for _ in range(n)]


def run_mode(core: EngineCore, work: list[tuple[list[int], int]], mode: str, batch: int) -> dict:
    stats = StepStats()
    core.hooks = stats
    preempted_before = core.scheduler.num_preemptions
    generated = {}

    def request(i: int, max_tokens: int) -> Request:
        return Request(f"{mode}-{i}", work[i][0], SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                                  ignore_eos=True))

    def drain() -> None:
        while core.has_work:
            for out in core.step():
                if out.finished:
                    generated[out.request_id] = out.num_output_tokens

    start, cpu_start = time.perf_counter(), time.process_time()
    if mode == "continuous":
        for i, (_, out_len) in enumerate(work):
            core.add(request(i, out_len))
        drain()
    else:
        for first in range(0, len(work), batch):
            members = range(first, min(first + batch, len(work)))
            longest = max(work[i][1] for i in members)
            for i in members:
                limit = longest if mode == "static" else work[i][1]
                core.add(request(i, min(limit, core.max_model_len - len(work[i][0]))))
            drain()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks
    useful = sum(min(generated[f"{mode}-{i}"], out_len) for i, (_, out_len) in enumerate(work))
    assert useful == sum(out_len for _, out_len in work), "a request generated fewer tokens than asked"
    return {
        "elapsed_s": round(elapsed, 3), "useful_tokens": useful, "generated_tokens": sum(generated.values()),
        "useful_tokens_per_s": round(useful / elapsed, 2), "requests_per_s": round(len(work) / elapsed, 3),
        # CPU time of this process: on a shared host, less skewed by other processes than wall time.
        "process_cpu_s": round(cpu, 3), "useful_tokens_per_cpu_s": round(useful / cpu, 2),
        "steps": stats.steps, "mean_seqs_per_step": round(stats.seqs / max(stats.steps, 1), 2),
        "mean_tokens_per_step": round(stats.tokens / max(stats.steps, 1), 2),
        "preemptions": core.scheduler.num_preemptions - preempted_before,
    }


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu: {cpu_name()} ({torch.get_num_threads()} threads)"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=STORIES260K if os.path.isdir(STORIES260K) else "demo")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--num-requests", type=int)
    p.add_argument("--max-num-seqs", type=int, help="batch size: running requests at most (both modes)")
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--prompt-len", type=int, nargs=2, metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, metavar=("MIN", "MAX"))
    p.add_argument("--kv-cache-memory", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="default bench/results/batching-<device>-<date>.json")
    args = p.parse_args(argv)
    for key, value in DEFAULTS["cuda" if args.device.startswith("cuda") else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = EngineConfig(
        model=args.model, device=args.device, dtype=args.dtype, load_format=args.load_format,
        block_size=args.block_size, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager).validate()
    t0 = time.perf_counter()
    core, info = build_engine_core(cfg)
    startup_s = time.perf_counter() - t0
    work = workload(args.num_requests, tuple(args.prompt_len), tuple(args.output_len), info.vocab_size, args.seed)
    longest = max(len(p) + n for p, n in work)
    assert longest <= core.max_model_len, f"workload needs {longest} tokens > max_model_len {core.max_model_len}"
    run_mode(core, work[:4], "continuous", args.max_num_seqs)  # warm-up: first-call costs out of the timings
    load_before = os.getloadavg()
    results = {}
    for mode in ("continuous", "static", "static_early_exit"):
        results[mode] = run_mode(core, work, mode, args.max_num_seqs)
        print(mode, json.dumps(results[mode]), flush=True)
    cont = results["continuous"]["useful_tokens_per_s"]
    report = {
        "benchmark": "batching", "device": device_name(args.device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(), "torch": torch.__version__,
        "config": {"model": info.name, "model_path": args.model, "dtype": info.dtype, "load_format": args.load_format,
                   "block_size": args.block_size, "num_kv_blocks": core.block_manager.num_blocks,
                   "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
                   "max_model_len": core.max_model_len, "enforce_eager": args.enforce_eager,
                   "torch_threads": torch.get_num_threads(), "startup_s": round(startup_s, 2)},
        # Other processes on the host skew absolute numbers (not the ratio's sign): the 1-minute
        # load average before and after the timed modes.
        "host_load_avg_1m": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "host_cpus": os.cpu_count(),
        "workload": {"num_requests": args.num_requests, "prompt_len": args.prompt_len,
                     "output_len": args.output_len, "distribution": "log-uniform", "seed": args.seed,
                     "prompt_tokens": sum(len(p) for p, _ in work), "output_tokens": sum(n for _, n in work),
                     "sampling": "greedy, ignore_eos"},
        "results": results,
        "ratio_continuous_over_static": round(cont / results["static"]["useful_tokens_per_s"], 2),
        "ratio_continuous_over_static_early_exit": round(
            cont / results["static_early_exit"]["useful_tokens_per_s"], 2),
        "ratio_continuous_over_static_by_cpu_time": round(
            results["continuous"]["useful_tokens_per_cpu_s"] / results["static"]["useful_tokens_per_cpu_s"], 2),
    }
    out = args.out or os.path.join(REPO, "bench", "results", "batching-{}-{}.json".format(
        "cuda" if args.device.startswith("cuda") else "cpu", datetime.date.today().isoformat()))
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    print(f"continuous / static = {report['ratio_continuous_over_static']}x useful tokens/s "
          f"(vs early-exit static {report['ratio_continuous_over_static_early_exit']}x); wrote {out}")
    return report


if __name__ == "__main__":
    main()
