"""What the engine benchmarks share: the ShareGPT-like length mix, the engine flags, driving an
EngineCore to completion, the results file and the closing table.

Used by bench/throughput.py, latency.py, serving.py, baseline_hf.py (through batching.py),
startup.py and batching.py; one definition of each, so that every benchmark means the same thing
by "the mix", "the 8B settings" and "a results file".
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import random
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.provenance import device_name, git_commit  # noqa: E402

STORIES260K = REPO.parent / "shared" / "models" / "stories260k"
CONFIGS = REPO / "bench" / "configs"

# The ShareGPT-like mix of issue 10: log-normal prompt and output lengths with these means (tokens)
# and sigma (of the underlying normal), as ShareGPT's conversations have (vLLM's benchmark reports
# about 215 input / 197 output tokens per request on its 1000-prompt sample). The seed is fixed so
# that every run and every engine sees the same 1000 requests.
SHAREGPT_INPUT_MEAN = 215
SHAREGPT_OUTPUT_MEAN = 197
SHAREGPT_SIGMA = 1.0
SHAREGPT_SEED = 20261201
FIRST_ORDINARY_ID = 3  # prompt ids avoid 0..2 (pad/bos/eos in the Llama-2 family); ignore_eos anyway

# The engine settings for the GPU runs (8B and 1B shapes).
GPU_ENGINE = dict(max_num_seqs=256, max_num_batched_tokens=8192, max_model_len=4096)


def lognormal_length(rng: random.Random, mean: float, sigma: float) -> int:
    """A log-normal draw with the given mean (mu = ln(mean) - sigma^2 / 2), at least 1."""
    return max(1, round(rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)))


def sharegpt_mix(num_requests: int, vocab_size: int, max_model_len: int, *, seed: int = SHAREGPT_SEED,
                 input_mean: float = SHAREGPT_INPUT_MEAN, output_mean: float = SHAREGPT_OUTPUT_MEAN,
                 sigma: float = SHAREGPT_SIGMA) -> list[tuple[list[int], int]]:
    """[(prompt ids, output length)], deterministic in seed.

    Clipped to max_model_len: the output to at most half of it, then the prompt to what is left, so
    that prompt + output <= max_model_len always (a few of the 1000 draws reach that far).
    """
    rng = random.Random(seed)
    work = []
    for _ in range(num_requests):
        prompt_len = lognormal_length(rng, input_mean, sigma)
        output_len = min(lognormal_length(rng, output_mean, sigma), max_model_len // 2)
        prompt_len = min(prompt_len, max_model_len - output_len)
        work.append(([rng.randrange(FIRST_ORDINARY_ID, vocab_size) for _ in range(prompt_len)], output_len))
    return work


def describe_mix(work: list[tuple[list[int], int]], **params) -> dict:
    """The mix as a results file records it: parameters and the realised totals."""
    prompts = [len(p) for p, _ in work]
    outputs = [n for _, n in work]
    return {**params, "num_requests": len(work), "distribution": "log-normal",
            "prompt_tokens": sum(prompts), "output_tokens": sum(outputs),
            "mean_prompt_len": round(sum(prompts) / len(work), 1),
            "mean_output_len": round(sum(outputs) / len(work), 1),
            "max_prompt_len": max(prompts), "max_output_len": max(outputs)}


def add_mix_args(p: argparse.ArgumentParser, num_requests: int) -> None:
    p.add_argument("--num-requests", type=int, default=num_requests)
    p.add_argument("--input-mean", type=float, default=SHAREGPT_INPUT_MEAN, help="mean prompt tokens")
    p.add_argument("--output-mean", type=float, default=SHAREGPT_OUTPUT_MEAN, help="mean output tokens")
    p.add_argument("--sigma", type=float, default=SHAREGPT_SIGMA, help="log-normal sigma of both lengths")
    p.add_argument("--seed", type=int, default=SHAREGPT_SEED, help="workload seed")


def mix_from_args(args: argparse.Namespace, vocab_size: int, max_model_len: int) -> list[tuple[list[int], int]]:
    return sharegpt_mix(args.num_requests, vocab_size, max_model_len, seed=args.seed,
                        input_mean=args.input_mean, output_mean=args.output_mean, sigma=args.sigma)


def mix_params(args: argparse.Namespace) -> dict:
    return {"input_mean": args.input_mean, "output_mean": args.output_mean, "sigma": args.sigma,
            "seed": args.seed}


def add_engine_args(p: argparse.ArgumentParser, *, max_num_seqs: int = 256, max_num_batched_tokens: int = 8192,
                    max_model_len: int | None = 4096) -> None:
    """The engine flags every in-process benchmark takes (names as engine_svc.server's)."""
    p.add_argument("--model", default=str(STORIES260K) if STORIES260K.is_dir() else "demo",
                   help="HF model directory, a bench/configs/ shape (with --load-format dummy), or 'demo'")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--max-num-seqs", type=int, default=max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=max_num_batched_tokens)
    p.add_argument("--max-model-len", type=int, default=max_model_len,
                   help="default: the model's own limit when it is shorter")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-memory", type=int, default=None, help="bytes for the KV cache")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    p.add_argument("--enforce-eager", action="store_true", help="CUDA: no CUDA graphs")
    p.add_argument("--mixed-graph-max-tokens", type=int, default=2048,
                   help="CUDA: prefill/mixed steps up to this many tokens replay piecewise graphs (0 = eager)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="the engine's automatic prefix caching (on by default, as in the engine)")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch threads (default: torch's)")
    p.add_argument("--out", default=None, help="results file (default bench/results/<name>-<device>-<date>.json)")


def engine_config(args: argparse.Namespace, max_model_len: int | None = None):
    """The EngineConfig the flags describe; max_model_len overrides --max-model-len."""
    from engine_svc.config import EngineConfig

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return EngineConfig(
        model=args.model, device=args.device, dtype=args.dtype, load_format=args.load_format,
        block_size=args.block_size, max_num_seqs=args.max_num_seqs,
        max_model_len=max_model_len or args.max_model_len, max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory=args.kv_cache_memory, gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager, enable_prefix_caching=args.enable_prefix_caching,
        mixed_graph_max_tokens=args.mixed_graph_max_tokens).validate()


def engine_server_flags(args: argparse.Namespace) -> list[str]:
    """The same engine settings as flags of an engine process (engine_svc.server)."""
    flags = ["--model", args.model, "--device", args.device, "--dtype", args.dtype,
             "--load-format", args.load_format, "--max-num-seqs", str(args.max_num_seqs),
             "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--block-size", str(args.block_size),
             "--gpu-memory-utilization", str(args.gpu_memory_utilization), "--log-level", "WARNING"]
    if args.max_model_len:
        flags += ["--max-model-len", str(args.max_model_len)]
    if args.kv_cache_memory:
        flags += ["--kv-cache-memory", str(args.kv_cache_memory)]
    if args.enforce_eager:
        flags.append("--enforce-eager")
    if not args.enable_prefix_caching:
        flags.append("--no-enable-prefix-caching")
    flags += ["--mixed-graph-max-tokens", str(args.mixed_graph_max_tokens)]
    if args.threads:
        flags += ["--cpu-threads", str(args.threads)]
    return flags


def model_config(model: str) -> dict:
    """A model directory's config.json ({} for 'demo')."""
    path = pathlib.Path(model) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def model_max_len(model: str) -> int | None:
    """max_position_embeddings of a model directory's config.json (None for 'demo')."""
    return model_config(model).get("max_position_embeddings")


def effective_max_model_len(args: argparse.Namespace) -> int | None:
    """--max-model-len, lowered to the model's own limit (stories260k: 512) so one flag set fits all."""
    own = model_max_len(args.model)
    if args.max_model_len is None:
        return own
    return min(args.max_model_len, own) if own else args.max_model_len


def engine_settings(args: argparse.Namespace, core, info) -> dict:
    """The engine configuration as a results file records it."""
    return {"model": info.name, "model_path": str(args.model), "dtype": info.dtype, "load_format": args.load_format,
            "block_size": args.block_size, "num_kv_blocks": core.block_manager.num_blocks,
            "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
            "max_model_len": core.max_model_len, "enforce_eager": args.enforce_eager,
            "enable_prefix_caching": args.enable_prefix_caching, "mixed_graph_max_tokens": args.mixed_graph_max_tokens}


def drain(core) -> dict[str, int]:
    """Step the core until it has no work; request id -> generated tokens of what finished."""
    generated = {}
    while core.has_work:
        for out in core.step():
            if out.finished:
                generated[out.request_id] = out.num_output_tokens
    return generated


def sync(device: str) -> None:
    """Wait for the device's queued work (so that wall-clock timings cover it)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(torch.device(device))


def device_kind(device: str) -> str:
    return "cuda" if device.startswith("cuda") else "cpu"


def save_report(name: str, report: dict, device: str, out: str | None = None) -> tuple[dict, list[str]]:
    """Add device, date and commit; write the JSON to `out` (default bench/results/), and a copy
    under $OUT when that is set (what a GPU run brings back). Returns the full report and the paths."""
    full = {"benchmark": name, "device": device_name(device),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit(), **report}
    if device_kind(device) == "cpu":
        full.setdefault("note", "CPU smoke run: shows that the benchmark works, not how fast anything is "
                                "(small sizes, a shared 2-core machine)")
    try:
        import torch

        full.setdefault("torch", torch.__version__)
    except ImportError:
        pass
    filename = f"{name}-{device_kind(device)}-{datetime.date.today().isoformat()}.json"
    paths = [out or str(REPO / "bench" / "results" / filename)]
    if os.environ.get("OUT"):
        paths.append(os.path.join(os.environ["OUT"], os.path.basename(paths[0])))
    text = json.dumps(full, indent=1) + "\n"
    for path in paths:
        pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(path).write_text(text)
    return full, paths


def print_table(headers: list[str], rows: list[list], title: str = "") -> None:
    """A plain-text table, columns sized to their widest cell (the last thing a benchmark prints)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    if title:
        print(title)
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    sys.stdout.flush()


def _cell(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)
