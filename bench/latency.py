"""Decode latency beside its memory-bandwidth floor, driving EngineCore directly.

    # GPU (issue 10's table): the 8B shape, random weights
    python3 bench/latency.py --device cuda --model bench/configs/llama3-8b --load-format dummy
    # CPU smoke (stories260k)
    python bench/latency.py --batch-sizes 1,2 --prompt-len 16 --steady-batch 4 --steady-context 64

A decode step must read every weight once (and, at larger batches, every cached K/V of the batch),
so the fastest a step can be is bytes read / the device's copy bandwidth. This run measures that
bandwidth itself (a large device-to-device copy, bytes read + written, --copy-mib) and reports:
- batch 1, 8, 32 (--batch-sizes) with --prompt-len-token prompts: ms per decode step (= ms per
  output token of each sequence), timed over --decode-steps steps after the prefill and a few warm
  steps, beside the floor weight bytes / bandwidth;
- steady decode at --steady-batch sequences of --steady-context tokens: ms per step beside its
  floor (weight bytes + the batch's KV bytes read that step) / bandwidth.
Greedy, ignore_eos; every figure is the mean over the timed steps.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench import harness  # noqa: E402
from engine_svc.core.request import FinishReason, Request  # noqa: E402
from engine_svc.sampling_params import SamplingParams  # noqa: E402

WARM_DECODE_STEPS = 4  # steps after the prefill before timing (graph replay, allocator warm)


def copy_bandwidth(device: str, nbytes: int, iters: int = 10) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read + written (the way a decode
    step streams its weights: read once, with a negligible write)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    harness.sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    harness.sync(device)
    elapsed = time.perf_counter() - start
    del src, dst
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return 2 * nbytes * iters / elapsed


def weight_bytes(core) -> int:
    """Bytes of the model's parameters (tied embeddings counted once)."""
    model = core.runner.model
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_bytes_per_token(core, info) -> int:
    """K and V bytes of one token over all layers, as the runner allocated them (an FP8 cache too)."""
    per_block = getattr(core.runner, "kv_bytes_per_block", None)
    if per_block is not None:
        return per_block() // core.block_manager.block_size
    element = torch.empty((), dtype=getattr(torch, info.dtype)).element_size()
    return 2 * info.num_layers * info.num_kv_heads * info.head_dim * element


def decode_ms_per_step(core, device: str, batch: int, prompt_len: int, steps: int, vocab: int,
                       seed: int) -> dict:
    """Prefill `batch` prompts of prompt_len tokens, then time `steps` decode steps."""
    rng = random.Random(seed)
    # Sequences prefilled first decode while the rest prefill (chunked over the token budget): room
    # for those tokens too, so that nobody finishes inside the timed window.
    prefill_steps = -(-batch * prompt_len // core.scheduler.max_num_batched_tokens) + 1
    params = SamplingParams(temperature=0.0, max_tokens=prefill_steps + WARM_DECODE_STEPS + steps + 2,
                            ignore_eos=True)
    reqs = [Request(f"lat-{batch}-{i}", [rng.randrange(3, vocab) for _ in range(prompt_len)], params)
            for i in range(batch)]
    for req in reqs:
        core.add(req)
    preempted = core.scheduler.num_preemptions
    while any(r.num_output_tokens == 0 for r in reqs):  # the prefill, chunked over steps if need be
        core.step()
    for _ in range(WARM_DECODE_STEPS):
        core.step()
    tokens_before = sum(r.num_tokens for r in reqs)
    harness.sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        core.step()
    harness.sync(device)
    elapsed = time.perf_counter() - start
    tokens_after = sum(r.num_tokens for r in reqs)
    assert tokens_after - tokens_before == batch * steps, "not one token per sequence and step"
    assert core.scheduler.num_preemptions == preempted, "preempted while timing: the KV cache is too small"
    core.abort_all(FinishReason.CANCELLED)
    harness.drain(core)
    return {"batch": batch, "ms_per_step": round(elapsed / steps * 1e3, 4), "steps": steps,
            "mean_context": round((tokens_before + tokens_after) / 2 / batch, 1)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_engine_args(p, **harness.GPU_ENGINE)
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-steps", type=int, default=64, help="timed decode steps per measurement")
    p.add_argument("--steady-batch", type=int, default=256, help="0 = skip the steady-decode measurement")
    p.add_argument("--steady-context", type=int, default=1024)
    p.add_argument("--copy-mib", type=int, default=None, help="copy size (default 4096 on CUDA, 256 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from engine_svc.engine_loop import build_engine_core
    from kvmesh.serving.heap import freeze_startup_heap

    copy_mib = args.copy_mib or (4096 if args.device.startswith("cuda") else 256)
    bandwidth = copy_bandwidth(args.device, copy_mib << 20)  # before the engine takes the memory
    core, info = build_engine_core(harness.engine_config(args, harness.effective_max_model_len(args)))
    freeze_startup_heap()  # as kvmesh-engine does once ready (kvmesh/serving/heap.py)
    weights = weight_bytes(core)
    kv_token = kv_bytes_per_token(core, info)
    floor_ms = weights / bandwidth * 1e3
    rows, results = [], {"batch": [], "steady": None}
    decode_ms_per_step(core, args.device, 1, args.prompt_len, 4, info.vocab_size, args.seed)  # warm-up
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        r = decode_ms_per_step(core, args.device, batch, args.prompt_len, args.decode_steps, info.vocab_size,
                               args.seed)
        r["floor_ms"] = round(floor_ms, 4)
        r["x_floor"] = round(r["ms_per_step"] / floor_ms, 3)
        results["batch"].append(r)
        rows.append([f"decode B={batch}, prompt {args.prompt_len}", r["ms_per_step"], r["floor_ms"], r["x_floor"]])
    if args.steady_batch:
        prompt = args.steady_context - WARM_DECODE_STEPS - 1 - args.decode_steps // 2  # centre the window
        r = decode_ms_per_step(core, args.device, args.steady_batch, prompt, args.decode_steps, info.vocab_size,
                               args.seed)
        kv_bytes = r["mean_context"] * args.steady_batch * kv_token
        r["kv_bytes_per_step"] = int(kv_bytes)
        r["floor_ms"] = round((weights + kv_bytes) / bandwidth * 1e3, 4)
        r["x_floor"] = round(r["ms_per_step"] / r["floor_ms"], 3)
        results["steady"] = r
        rows.append([f"steady B={args.steady_batch}, context {r['mean_context']:.0f}", r["ms_per_step"],
                     r["floor_ms"], r["x_floor"]])
    report = {"config": harness.engine_settings(args, core, info),
              "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1), "copy_mib": copy_mib,
              "weight_bytes": weights, "kv_bytes_per_token": kv_token,
              "floor": "bytes read per step / copy bandwidth (bytes read + written per second)",
              "sampling": "greedy, ignore_eos", "results": results}
    report, paths = harness.save_report(f"latency-{info.name}", report, args.device, args.out)
    harness.print_table(["measurement", "ms/step", "floor ms", "x floor"], rows,
                        title=f"latency: {info.name}, copy bandwidth {bandwidth / 1e9:.0f} GB/s, "
                              f"{report['device']}; wrote {', '.join(paths)}")
    return report


if __name__ == "__main__":
    sys.exit(main() and 0)
