"""Continuous batching vs static batching on the same workload and GPU, in the same run.

    python bench/batching.py                                   # CPU, stories260k (or --model demo)
    python bench/batching.py --device cuda --model bench/configs/llama3-8b --load-format dummy
    python bench/baseline_hf.py ...                            # = --modes hf_static,continuous --workload sharegpt

Workloads (--workload): `log-uniform` (default): prompt and output lengths drawn log-uniformly from
--prompt-len / --output-len (a long tail, as real traffic has); `sharegpt`: bench/harness.py's
ShareGPT-like log-normal mix (means 215 / 197, sigma 1, --input-mean / --output-mean). Random prompt
ids, greedy, ignore_eos so each request generates exactly its own output length. All requests are
queued at t=0 (offline throughput).

Modes (--modes), each run once on the same workload:
- continuous: every request is queued at once on our EngineCore; the scheduler keeps up to
  --max-num-seqs running and admits a waiting request as soon as one finishes (normal operation).
- static: HF `generate` style on our EngineCore. Take the next --max-num-seqs requests, run the
  batch until its longest member is done (every member generates the batch's longest output length,
  as one `max_new_tokens` per batch does), then take the next batch. Tokens past a request's own
  output length are computed but not useful.
- static_early_exit: as static, but finished members leave the batch (our engine frees them); the
  next batch still waits for the whole batch. Shows how much of the gap is padding vs waiting.
- hf_static: HF transformers itself: `model.generate` on left-padded batches of --hf-batch-size
  requests, max_new_tokens = min_new_tokens = the batch's longest output (SDPA attention, its
  dynamic KV cache). Runs first, and frees the GPU before our engine is built.

Useful tokens/s = sum of each request's own output length / wall time of the mode.
Writes JSON (device, date, git commit, config, workload, per-mode results, ratios) to --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench import harness  # noqa: E402
from engine_svc.core.engine_core import EngineCore  # noqa: E402
from engine_svc.core.hooks import EngineHooks, StepInfo  # noqa: E402
from engine_svc.core.request import Request  # noqa: E402
from engine_svc.sampling_params import SamplingParams  # noqa: E402

MODES = ["continuous", "static", "static_early_exit", "hf_static"]
# Per-device defaults: CPU runs in about a minute; CUDA is sized to fill a batch of 256.
DEFAULTS = {
    "cpu": dict(num_requests=96, max_num_seqs=16, max_num_batched_tokens=512, prompt_len=(8, 96),
                output_len=(8, 256), max_model_len=None, hf_batch_size=16),
    # max_model_len 4096: the workload needs 2048; the model's own limit (131072 for Llama 3.1)
    # would only widen block tables and CUDA-graph buffers.
    "cuda": dict(num_requests=1024, max_num_seqs=256, max_num_batched_tokens=8192, prompt_len=(32, 1024),
                 output_len=(16, 1024), max_model_len=4096, hf_batch_size=64),
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


def run_mode(core: EngineCore, work: list[tuple[list[int], int]], mode: str, batch: int, device: str = "cpu") -> dict:
    stats = StepStats()
    core.hooks = stats
    preempted_before = core.scheduler.num_preemptions
    generated = {}

    def request(i: int, max_tokens: int) -> Request:
        return Request(f"{mode}-{i}", work[i][0], SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                                  ignore_eos=True))

    harness.sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    if mode == "continuous":
        for i, (_, out_len) in enumerate(work):
            core.add(request(i, out_len))
        generated.update(harness.drain(core))
    else:
        for first in range(0, len(work), batch):
            members = range(first, min(first + batch, len(work)))
            longest = max(work[i][1] for i in members)
            for i in members:
                limit = longest if mode == "static" else work[i][1]
                core.add(request(i, min(limit, core.max_model_len - len(work[i][0]))))
            generated.update(harness.drain(core))
    harness.sync(device)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    bm = core.block_manager  # nothing in use; finished prompts may stay cached (prefix caching)
    assert bm.num_in_use_blocks == 0 and bm.num_free_blocks + bm.num_cached_blocks == bm.num_blocks
    useful = sum(min(generated[f"{mode}-{i}"], out_len) for i, (_, out_len) in enumerate(work))
    assert useful == sum(out_len for _, out_len in work), "a request generated fewer tokens than asked"
    return summarize(work, generated, elapsed, cpu) | {
        "steps": stats.steps, "mean_seqs_per_step": round(stats.seqs / max(stats.steps, 1), 2),
        "mean_tokens_per_step": round(stats.tokens / max(stats.steps, 1), 2),
        "preemptions": core.scheduler.num_preemptions - preempted_before,
    }


def summarize(work: list[tuple[list[int], int]], generated: dict, elapsed: float, cpu: float) -> dict:
    useful = sum(n for _, n in work)
    return {
        "elapsed_s": round(elapsed, 3), "useful_tokens": useful, "generated_tokens": sum(generated.values()),
        "useful_tokens_per_s": round(useful / elapsed, 2), "requests_per_s": round(len(work) / elapsed, 3),
        # CPU time of this process: on a shared host, less skewed by other processes than wall time.
        "process_cpu_s": round(cpu, 3), "useful_tokens_per_cpu_s": round(useful / cpu, 2),
    }


def hf_dtype(args: argparse.Namespace, config) -> torch.dtype:
    """Our engine's rule for --dtype auto: the checkpoint's dtype on CUDA, float32 on the CPU."""
    if args.dtype != "auto":
        return getattr(torch, args.dtype)
    if not args.device.startswith("cuda"):
        return torch.float32
    named = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    return getattr(torch, str(named).removeprefix("torch.")) if isinstance(named, str) else named


def load_hf_model(args: argparse.Namespace):
    """The same model in HF transformers: its checkpoint, or random weights in its shape (dummy)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(args.model, local_files_only=True)
    dtype = hf_dtype(args, config)
    if args.load_format == "dummy":
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa",
                                                     local_files_only=True).to(args.device)
    return model.eval()


def hf_generate_batch(model, batch: list[tuple[list[int], int]], device: str) -> int:
    """One static batch: left-padded prompts, every row generates the batch's longest output.
    Returns the tokens generated (rows x longest)."""
    longest_prompt = max(len(p) for p, _ in batch)
    longest = max(n for _, n in batch)
    ids = torch.zeros(len(batch), longest_prompt, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (prompt, _) in enumerate(batch):
        ids[row, longest_prompt - len(prompt):] = torch.tensor(prompt)
        mask[row, longest_prompt - len(prompt):] = 1
    with torch.inference_mode():
        out = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=longest,
                             min_new_tokens=longest, do_sample=False, pad_token_id=0)
    assert out.shape[1] == longest_prompt + longest, "HF generate stopped early"
    return len(batch) * longest


def run_hf_static(args: argparse.Namespace, work: list[tuple[list[int], int]]) -> dict:
    """HF transformers static batching over the workload; frees the model (and GPU memory) after."""
    load_start = time.perf_counter()
    model = load_hf_model(args)
    load_s = time.perf_counter() - load_start
    hf_generate_batch(model, work[:2], args.device)  # warm-up: cuBLAS handles, allocator
    generated = {}
    harness.sync(args.device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for first in range(0, len(work), args.hf_batch_size):
        generated[first] = hf_generate_batch(model, work[first:first + args.hf_batch_size], args.device)
    harness.sync(args.device)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    del model
    gc.collect()  # the model and its caches may sit in reference cycles: free them before our engine sizes
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return summarize(work, generated, elapsed, cpu) | {
        "batch_size": args.hf_batch_size, "batches": len(generated), "load_s": round(load_s, 2),
        "attention": "sdpa", "implementation": "transformers generate, left-padded static batches"}


def parse_args(argv=None, name: str = "batching", modes: str = "continuous,static,static_early_exit",
               workload_kind: str = "log-uniform") -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # None = the per-device default of DEFAULTS.
    harness.add_engine_args(p, max_num_seqs=None, max_num_batched_tokens=None, max_model_len=None)
    harness.add_mix_args(p, num_requests=None)
    p.set_defaults(seed=0)
    p.add_argument("--workload", default=workload_kind, choices=["log-uniform", "sharegpt"])
    p.add_argument("--prompt-len", type=int, nargs=2, metavar=("MIN", "MAX"), help="log-uniform workload")
    p.add_argument("--output-len", type=int, nargs=2, metavar=("MIN", "MAX"), help="log-uniform workload")
    p.add_argument("--modes", default=modes, help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--hf-batch-size", type=int, help="hf_static: requests per generate() call")
    p.add_argument("--name", default=name, help="the results file's name")
    args = p.parse_args(argv)
    for key, value in DEFAULTS[harness.device_kind(args.device)].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.modes = args.modes.split(",")
    unknown = set(args.modes) - set(MODES)
    if unknown:
        p.error(f"unknown modes {sorted(unknown)}; use {MODES}")
    return args


def make_workload(args: argparse.Namespace, vocab_size: int, max_model_len: int) -> tuple[list, dict]:
    """The requests and their description for the results file."""
    if args.workload == "sharegpt":
        work = harness.mix_from_args(args, vocab_size, max_model_len)
        return work, harness.describe_mix(work, **harness.mix_params(args))
    work = workload(args.num_requests, tuple(args.prompt_len), tuple(args.output_len), vocab_size, args.seed)
    return work, {"num_requests": args.num_requests, "prompt_len": args.prompt_len, "output_len": args.output_len,
                  "distribution": "log-uniform", "seed": args.seed,
                  "prompt_tokens": sum(len(p) for p, _ in work), "output_tokens": sum(n for _, n in work)}


def main(argv=None, **defaults) -> dict:
    """Run the modes; `defaults` (name, modes, workload_kind) serve bench/baseline_hf.py."""
    from engine_svc.engine_loop import build_engine_core
    from kvmesh.serving.heap import freeze_startup_heap

    args = parse_args(argv, **defaults)
    cfg = harness.engine_config(args, harness.effective_max_model_len(args))
    results = {}
    load_before = os.getloadavg()
    if "hf_static" in args.modes:  # first: our engine takes the GPU memory that is left
        vocab = harness.model_config(args.model)["vocab_size"]
        hf_work, _ = make_workload(args, vocab, cfg.max_model_len or harness.model_max_len(args.model))
        results["hf_static"] = run_hf_static(args, hf_work)
        print("hf_static", json.dumps(results["hf_static"]), flush=True)
    t0 = time.perf_counter()
    core, info = build_engine_core(cfg)
    freeze_startup_heap()  # as kvmesh-engine does once ready (kvmesh/serving/heap.py)
    startup_s = time.perf_counter() - t0
    work, described = make_workload(args, info.vocab_size, core.max_model_len)
    assert "hf_static" not in results or work == hf_work, "HF and our engine must see the same requests"
    longest = max(len(p) + n for p, n in work)
    assert longest <= core.max_model_len, f"workload needs {longest} tokens > max_model_len {core.max_model_len}"
    run_mode(core, work[:4], "continuous", args.max_num_seqs, args.device)  # warm-up: first-call costs out of the timings
    for mode in (m for m in args.modes if m != "hf_static"):
        results[mode] = run_mode(core, work, mode, args.max_num_seqs, args.device)
        print(mode, json.dumps(results[mode]), flush=True)
    report = {
        "config": {**harness.engine_settings(args, core, info), "hf_batch_size": args.hf_batch_size,
                   "torch_threads": torch.get_num_threads(), "startup_s": round(startup_s, 2)},
        # Other processes on the host skew absolute numbers (not the ratio's sign): the 1-minute
        # load average before and after the timed modes.
        "host_load_avg_1m": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "host_cpus": os.cpu_count(),
        "workload": {**described, "workload": args.workload, "sampling": "greedy, ignore_eos"},
        "results": results, **ratios(results),
    }
    report, paths = harness.save_report(args.name, report, args.device, args.out)
    base = results.get("continuous", {}).get("useful_tokens_per_s")
    harness.print_table(
        ["mode", "useful tok/s", "req/s", "generated tok", "elapsed s", "continuous / this"],
        [[m, r["useful_tokens_per_s"], r["requests_per_s"], r["generated_tokens"], r["elapsed_s"],
          round(base / r["useful_tokens_per_s"], 2) if base else None] for m, r in results.items()],
        title=f"{args.name}: {info.name}, {len(work)} requests ({args.workload}), {report['device']}; "
              f"wrote {', '.join(paths)}")
    return report


def ratios(results: dict) -> dict:
    """continuous / each static mode, by useful tokens per second of wall time (and of CPU time)."""
    if "continuous" not in results:
        return {}
    cont = results["continuous"]
    out = {}
    for mode, r in results.items():
        if mode != "continuous":
            out[f"ratio_continuous_over_{mode}"] = round(cont["useful_tokens_per_s"] / r["useful_tokens_per_s"], 2)
            out[f"ratio_continuous_over_{mode}_by_cpu_time"] = round(
                cont["useful_tokens_per_cpu_s"] / r["useful_tokens_per_cpu_s"], 2)
    return out


if __name__ == "__main__":
    sys.exit(main() and 0)
