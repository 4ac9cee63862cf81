"""kernels/skinny_gemm.py against cuBLAS (F.linear) on the 8B shape's projections at decode batch sizes.

    python3 bench/skinny_gemm.py --out $OUT/skinny-gemm-h200.json      # GPU only

For each projection (q|k|v, o, gate|up, down, lm_head) and each batch M, 32 calls over 32 distinct
weight copies (as the 32 layers of a step read 32 different weights, so the L2 holds none of them)
are captured in one CUDA graph and replayed; the median per call is reported with the bytes it must
read (the weight) over that time, against the copy bandwidth measured in the same run. Variants of
the skinny plan (BLOCK_N, BLOCK_K, stages) are timed beside the default plan; the table says which
wins per shape. Results: bench/results/skinny-gemm-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.harness import print_table, save_report  # noqa: E402
from kernels.skinny_gemm import plan, skinny_linear  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
VARIANTS = [{"block_n": 16, "block_k": 256, "num_stages": 4}, {"block_n": 32, "block_k": 256, "num_stages": 4},
            {"block_n": 64, "block_k": 128, "num_stages": 4}, {"block_n": 32, "block_k": 128, "num_stages": 5},
            {"block_n": 16, "block_k": 512, "num_stages": 3}]
LAYERS = 32


def copy_gbps(mib: int = 4096) -> float:
    a = torch.empty(mib << 20, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() / graph_ms(lambda: b.copy_(a), 1) / 1e6


def graph_ms(fn, calls: int, reps: int = 20, trials: int = 5) -> float:
    """Median ms per call of `fn` replayed from a CUDA graph of one pass (fn makes `calls` calls)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps / calls)
    return statistics.median(times)


def bench_shape(name: str, n: int, k: int, ms: list[int], bw: float) -> list[dict]:
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for _ in range(LAYERS)]
    nbytes = n * k * 2
    rows = []
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = torch.nn.functional.linear(x, weights[0])
        err = ((skinny_linear(x, weights[0]).float() - ref.float()).norm() / ref.float().norm()).item()
        base = graph_ms(lambda: [torch.nn.functional.linear(x, w) for w in weights], LAYERS)
        row = {"shape": name, "N": n, "K": k, "M": m, "cublas_ms": round(base, 5),
               "cublas_pct_copy": round(100 * nbytes / base / 1e6 / bw, 1), "rel_err_vs_cublas": err,
               "default_plan": plan(n, k, x.device), "variants": []}
        for po in [None] + VARIANTS:
            t = graph_ms(lambda: [skinny_linear(x, w, plan_overrides=po) for w in weights], LAYERS)
            row["variants"].append({"plan": po or "default", "ms": round(t, 5),
                                    "pct_copy": round(100 * nbytes / t / 1e6 / bw, 1), "vs_cublas": round(base / t, 3)})
        rows.append(row)
        print(name, m, {v["plan"] if isinstance(v["plan"], str) else tuple(v["plan"].values()): v["vs_cublas"]
                        for v in row["variants"]}, "cublas %copy", row["cublas_pct_copy"], flush=True)
    del weights
    torch.cuda.empty_cache()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,4,8,16")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("skinny_gemm.py needs a CUDA GPU", file=sys.stderr)
        return 2
    bw = copy_gbps()
    ms = [int(b) for b in args.batches.split(",")]
    rows = []
    for name in args.shapes.split(","):
        rows += bench_shape(name, *SHAPES[name], ms, bw)
    save_report("skinny-gemm", {"copy_gbps": round(bw, 1), "layers_per_graph": LAYERS, "rows": rows}, "cuda", args.out)
    table = []
    for r in rows:
        best = max(r["variants"], key=lambda v: v["vs_cublas"])
        default = r["variants"][0]
        table.append([r["shape"], r["M"], r["cublas_ms"], r["cublas_pct_copy"], default["ms"], default["pct_copy"],
                      default["vs_cublas"], best["vs_cublas"], str(best["plan"])])
    print_table(["shape", "M", "cuBLAS ms", "% copy", "skinny ms", "% copy", "x cuBLAS", "best x", "best plan"], table,
                f"skinny GEMM vs cuBLAS, bf16, copy {bw:.0f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
