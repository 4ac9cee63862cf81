"""Offline throughput on the ShareGPT-like mix, driving EngineCore directly (no RPC, no tokenizer).

    # GPU (issue 10's table): the 8B and the 1B shape, random weights, each in its own process
    python3 bench/throughput.py --device cuda --model bench/configs/llama3-8b --load-format dummy
    python3 bench/throughput.py --device cuda --model bench/configs/llama3.2-1b --load-format dummy
    # CPU smoke (stories260k): a few short requests
    python bench/throughput.py --num-requests 16 --input-mean 24 --output-mean 16

Workload: --num-requests (1000) requests, prompt and output lengths log-normal (means 215 / 197 tokens,
sigma 1, seed 20261201; bench/harness.py's sharegpt_mix), random prompt ids, all queued at t=0,
ignore_eos (every request generates exactly its own output length). Engine: max_num_seqs 256,
max_num_batched_tokens 8192, max_model_len 4096 (lowered to the model's own limit).

For each --temperatures value: a short warm-up, one timed run of the whole mix (req/s, output tok/s,
total tok/s = (prompt + output) tokens / wall), then on CUDA a second pass over the same mix that
profiles --profile-steps steps after --profile-skip (torch profiler, CUDA activity only): GPU busy
fraction = the union of the device's kernel/memcpy intervals / the window's wall time. On CPU the
busy fraction is n/a.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import harness  # noqa: E402
from engine_svc.core.request import FinishReason, Request  # noqa: E402
from engine_svc.sampling_params import SamplingParams  # noqa: E402


def requests(work: list[tuple[list[int], int]], temperature: float, tag: str) -> list[Request]:
    """The mix as requests; cache_salt=tag: a run never hits the prefix cache another run (the warm-up,
    the other temperature) left behind, as fresh prompts would not."""
    return [Request(f"{tag}-{i}", prompt, SamplingParams(temperature=temperature, max_tokens=n, ignore_eos=True),
                    cache_salt=tag) for i, (prompt, n) in enumerate(work)]


def timed_run(core, work: list[tuple[list[int], int]], temperature: float, device: str, tag: str) -> dict:
    """Queue the whole mix at once and step until done; throughput figures of that run."""
    steps_before, preempted_before = core.num_steps, core.scheduler.num_preemptions
    harness.sync(device)
    start = time.perf_counter()
    for req in requests(work, temperature, tag):
        core.add(req)
    generated = harness.drain(core)
    harness.sync(device)
    elapsed = time.perf_counter() - start
    bm = core.block_manager  # nothing in use; finished prompts may stay cached (prefix caching)
    assert bm.num_in_use_blocks == 0 and bm.num_free_blocks + bm.num_cached_blocks == bm.num_blocks, "KV blocks leaked"
    out_tokens = sum(generated.values())
    assert out_tokens == sum(n for _, n in work), "a request generated other than its own output length"
    prompt_tokens = sum(len(p) for p, _ in work)
    steps = core.num_steps - steps_before
    return {"elapsed_s": round(elapsed, 3), "requests_per_s": round(len(work) / elapsed, 3),
            "output_tokens_per_s": round(out_tokens / elapsed, 1),
            "total_tokens_per_s": round((prompt_tokens + out_tokens) / elapsed, 1),
            "steps": steps, "mean_step_ms": round(elapsed / steps * 1e3, 3),
            "preemptions": core.scheduler.num_preemptions - preempted_before}


def busy_intervals_us(prof) -> list[tuple[float, float]]:
    """(start, end) in microseconds of every device-side event (kernels, memcpy, memset)."""
    from torch.autograd import DeviceType

    return [(e.start_ns() / 1e3, e.end_ns() / 1e3) for e in prof.profiler.kineto_results.events()
            if e.device_type() == DeviceType.CUDA]


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by the intervals (overlapping kernels on two streams count once)."""
    total, end = 0.0, float("-inf")
    for lo, hi in sorted(intervals):
        if hi > end:
            total += hi - max(lo, end)
            end = hi
    return total


def gpu_busy(core, work, temperature: float, device: str, skip: int, steps: int) -> dict:
    """Profile a window of steps in the middle of the mix; the device's busy fraction over it."""
    from torch.profiler import ProfilerActivity, profile

    for req in requests(work, temperature, "profile"):
        core.add(req)
    for _ in range(skip):
        core.step()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        harness.sync(device)
        start, first = time.perf_counter(), core.num_steps
        while core.has_work and core.num_steps - first < steps:
            core.step()
        harness.sync(device)
        wall_us = (time.perf_counter() - start) * 1e6
        profiled = core.num_steps - first
    core.abort_all(FinishReason.CANCELLED)
    harness.drain(core)
    intervals = busy_intervals_us(prof)
    busy_us = union_length(intervals)
    return {"gpu_busy_fraction": round(busy_us / wall_us, 4), "profiled_steps": profiled,
            "gpu_busy_ms_per_step": round(busy_us / profiled / 1e3, 3),
            "wall_ms_per_step": round(wall_us / profiled / 1e3, 3),
            "device_kernel_sum_ms_per_step": round(sum(b - a for a, b in intervals) / profiled / 1e3, 3)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_engine_args(p, **harness.GPU_ENGINE)
    harness.add_mix_args(p, num_requests=1000)
    p.add_argument("--temperatures", default="1.0,0", help="comma-separated; one timed run each")
    p.add_argument("--warmup-requests", type=int, default=16)
    p.add_argument("--profile-skip", type=int, default=100, help="steps before the profiled window")
    p.add_argument("--profile-steps", type=int, default=50, help="steps in the profiled window (CUDA)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from engine_svc.engine_loop import build_engine_core
    from kvmesh.serving.heap import freeze_startup_heap

    cfg = harness.engine_config(args, harness.effective_max_model_len(args))
    start = time.perf_counter()
    core, info = build_engine_core(cfg)
    freeze_startup_heap()  # as kvmesh-engine does once ready (kvmesh/serving/heap.py)
    startup_s = time.perf_counter() - start
    work = harness.mix_from_args(args, info.vocab_size, core.max_model_len)
    results = {}
    for temperature in (float(t) for t in args.temperatures.split(",")):
        key = f"temperature_{temperature:g}"
        timed_run(core, work[:args.warmup_requests], temperature, args.device, f"warmup-{key}")
        results[key] = timed_run(core, work, temperature, args.device, key)
        if args.device.startswith("cuda") and args.profile_steps > 0:
            results[key].update(gpu_busy(core, work, temperature, args.device, args.profile_skip,
                                         args.profile_steps))
        else:
            results[key]["gpu_busy_fraction"] = None  # no device profiler on the CPU
        print(key, results[key], flush=True)
    report = {"config": {**harness.engine_settings(args, core, info), "startup_s": round(startup_s, 2)},
              "workload": {**harness.describe_mix(work, **harness.mix_params(args)),
                           "arrivals": "all at t=0", "ignore_eos": True},
              "results": results}
    report, paths = harness.save_report(f"throughput-{info.name}", report, args.device, args.out)
    harness.print_table(
        ["temperature", "req/s", "output tok/s", "total tok/s", "GPU busy", "ms/step", "preempt"],
        [[k.removeprefix("temperature_"), r["requests_per_s"], r["output_tokens_per_s"], r["total_tokens_per_s"],
          r["gpu_busy_fraction"], r["mean_step_ms"], r["preemptions"]] for k, r in results.items()],
        title=f"throughput: {info.name}, {len(work)} requests, {report['device']}; wrote {', '.join(paths)}")
    return report


if __name__ == "__main__":
    sys.exit(main() and 0)
