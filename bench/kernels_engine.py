"""The kernels' effect on the engine: TTFT of one 2k and one 8k prompt at batch 1, KV blocks and decode
throughput at B=256, through ModelRunner on one CUDA GPU (Llama-3.1-8B shape, dummy weights).

    python bench/kernels_engine.py --label kernels [--kv-cache-dtype fp8] --out result.json

Runs against whichever engine_svc / kernels are first on sys.path, so the same script measures a
baseline tree (``cd base && python ../kernels/bench/kernels_engine.py ...``) and this one in one session.
TTFT: with prefill attention through kernels/prefill_attention.py (``ttft_N_ms``) and through the
block-table programs (``ttft_N_block_table_ms``), same runner, same run; host-timed execute() of the whole prompt (prefill chunks of --chunk tokens, the last one samples),
synchronised, median of --reps after a warm-up run. Decode: 256 sequences at --decode-ctx positions
over a KV cache filled with random values (never zeros), replayed from the B=256 CUDA graph; tokens/s =
256 / median step time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

# The trees under test come from PYTHONPATH: drop this script's own folder, whose kernels.py (the kernel
# benchmark) would otherwise shadow the kernels package.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

import torch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "bench", "configs", "llama3-8b")


def build_runner(args):
    import engine_svc.cuda_graphs
    import engine_svc.model_runner as mr
    from engine_svc.config import EngineConfig

    # one batch size: capturing all 20 costs device time (capture_decode_graphs reads this module's list)
    engine_svc.cuda_graphs.GRAPH_BATCH_SIZES = [args.decode_batch]
    kw = {"kv_cache_dtype": args.kv_cache_dtype} if args.kv_cache_dtype != "auto" else {}
    cfg = EngineConfig(model=CONFIG, device="cuda", load_format="dummy", dtype="bfloat16",
                       max_model_len=args.max_model_len, max_num_seqs=args.decode_batch,
                       max_num_batched_tokens=args.chunk, gpu_memory_utilization=0.90, **kw)
    runner = mr.ModelRunner(cfg)
    runner.load_model()
    blocks = runner.determine_num_blocks()
    runner.allocate_kv_cache(blocks)
    runner.warmup()
    return runner, blocks


def fill_random(runner) -> None:
    """Random K/V in every block (FP8 caches through a bf16 temporary: random bytes would hold NaNs)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    for k, v in runner.kv_caches:
        for c in (k, v):
            for part in c.split(4096):
                tmp = torch.randn(part.shape, device="cuda", dtype=torch.bfloat16, generator=gen)
                part.copy_(tmp.clamp(-4, 4).to(part.dtype))


def use_contiguous_prefill(enabled: bool) -> None:
    """Switch prefill chunks between kernels/prefill_attention.py (the chunk's K/V through TMA, the
    default) and the block-table prefill programs of paged_attention (before it), to time both in one
    run over the same runner."""
    import kernels.paged_attention as pa
    from kernels.prefill_attention import suits

    pa.prefill_attention_suits = suits if enabled else (lambda *a: False)


def ttft_s(runner, prompt_len, chunk, reps) -> list[float]:
    from engine_svc.sampling_params import SamplingParams
    from engine_svc.step import ScheduledSeq

    bs = runner.block_size
    ids = torch.randint(0, 128000, (prompt_len,)).tolist()
    blocks = list(range(1, 1 + -(-prompt_len // bs)))
    params = SamplingParams(temperature=0.0)
    times = []
    for _ in range(reps + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for start in range(0, prompt_len, chunk):
            new = ids[start:start + chunk]
            last = start + len(new) == prompt_len
            out = runner.execute([ScheduledSeq("r", new, start, blocks[:-(-(start + len(new)) // bs)], last,
                                               params, ids, [])])
        assert out[0] is not None
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times[1:]  # the first run compiles


def decode_step_s(runner, batch, ctx, steps) -> list[float]:
    """Step times of `batch` sequences decoding from position ctx on, as the engine core steps them:
    admitted once, then plans that name the running rows only (the runner's persistent batch). Until
    fb90367 every timed step re-admitted all rows through execute(), which timed host work: 43-45
    ms a step at B=256 ctx 2048 against ~26 ms of device time."""
    from engine_svc.sampling_params import SamplingParams
    from engine_svc.step import ScheduledSeq, StepPlan

    bs = runner.block_size
    per_seq = -(-(ctx + steps + 4) // bs)
    assert batch * per_seq + 1 <= runner.num_blocks, "KV cache too small for the decode shape"
    params = SamplingParams(temperature=0.0)
    ids = [str(i) for i in range(batch)]
    runner.execute([ScheduledSeq(ids[i], [3 + i % 200], ctx, list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)),
                                 True, params, [1] * ctx, []) for i in range(batch)])
    plan = StepPlan(req_ids=ids, num_new_tokens=[1] * batch, sample=[True] * batch)
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(steps + 3):
        sync()
        t0 = time.perf_counter()
        runner.launch(plan).result()
        sync()
        times.append(time.perf_counter() - t0)
    return times[3:]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--max-model-len", type=int, default=16384)
    ap.add_argument("--chunk", type=int, default=8192, help="prefill tokens per step (max_num_batched_tokens)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--decode-batch", type=int, default=256)
    ap.add_argument("--decode-ctx", type=int, default=2048)
    ap.add_argument("--decode-steps", type=int, default=10)
    ap.add_argument("--skip-ttft", action="store_true")
    args = ap.parse_args()
    t_start = time.perf_counter()
    runner, blocks = build_runner(args)
    res = {"label": args.label, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "commit": os.environ.get("KVMESH_COMMIT", "unknown"), "kv_cache_dtype": args.kv_cache_dtype,
           "kv_blocks": blocks, "kv_bytes_per_block": runner.kv_bytes_per_block(),
           "kv_tokens": blocks * runner.block_size, "setup_s": time.perf_counter() - t_start,
           "model": "llama3-8b shape, dummy bf16 weights", "chunk": args.chunk}
    if not args.skip_ttft:
        for n in (2048, 8192):
            for mode in ("block_table", "contiguous"):  # prefill attention before / after, same runner
                use_contiguous_prefill(mode == "contiguous")
                t = ttft_s(runner, n, args.chunk, args.reps)
                key = f"ttft_{n}_ms" if mode == "contiguous" else f"ttft_{n}_{mode}_ms"
                res[key] = 1000 * statistics.median(t)
                res[key.replace("_ms", "_all_ms")] = [1000 * x for x in t]
                print(args.label, f"TTFT {n} ({mode}): {res[key]:.1f} ms", flush=True)
        use_contiguous_prefill(True)
    fill_random(runner)
    t = decode_step_s(runner, args.decode_batch, args.decode_ctx, args.decode_steps)
    res["decode_step_ms"] = 1000 * statistics.median(t)
    res["decode_tok_s"] = args.decode_batch / statistics.median(t)
    res["decode_shape"] = {"batch": args.decode_batch, "ctx": args.decode_ctx}
    res["total_s"] = time.perf_counter() - t_start
    print(args.label, json.dumps({k: v for k, v in res.items() if not k.endswith("all_ms")}), flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
