"""Kernel benchmarks on one CUDA GPU: paged attention (decode, prefill) against SDPA, fused layers
against eager PyTorch, with the device's measured copy bandwidth and matmul rate as ceilings.

    python bench/kernels.py --out bench/results/kernels-<device>-<date>.json [--sweep]

Timing: triton.testing.do_bench medians (it clears a 256 MB buffer before every repetition, so the
L2 is cold). Attention (ours and SDPA alike) is timed as CUDA-graph replays, as the engine runs decode,
so host launch cost stays out; fused layers as eager calls, whose launch cost hides behind the clear.
Every input is random, never zeros, and each timed kernel's output is checked against its baseline
once before timing.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import math
import os
import subprocess
import sys

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels.activation import silu_and_mul  # noqa: E402
from kernels.kv_cache import quantize_fp8, write_kv_cache  # noqa: E402
from kernels.paged_attention import paged_attention  # noqa: E402
from kernels.prefill_attention import suits as prefill_attention_suits  # noqa: E402
from kernels.rms_norm import rms_norm  # noqa: E402
from kernels.rotary import apply_rotary, build_cos_sin_cache  # noqa: E402

H, HKV, D, BS = 32, 8, 128, 16  # query heads, KV heads, head dim, KV block size
DT = torch.bfloat16
BATCHES = [1, 8, 64, 256]
CONTEXTS = [512, 2048, 4096, 8192, 32768]
PREFILL_MAX_TOKENS = 65536  # prefill shapes with B * ctx above this are skipped (seconds per call)
FP8_SCALE = 0.05  # per-tensor K/V scale of the FP8 rows
FP8_DECODE_SHAPES = [(1, 4096), (8, 4096), (64, 4096), (256, 4096), (256, 8192)]
ENGINE_MAX_LEN = 131072  # Llama-3.1's max_model_len: the limit the engine's decode graphs are captured under


def ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def capture_graph(fn) -> torch.cuda.CUDAGraph:
    """fn captured in a CUDA graph, after a compiling call and a warm-up on a side stream."""
    fn()  # compile
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def graph_ms(fn) -> float:
    """Median of CUDA-graph replays of fn (as the engine runs decode): no host launch cost inside."""
    g = capture_graph(fn)
    t = ms(g.replay)
    del g
    return t


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def free_bytes() -> int:
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


def ceilings() -> dict:
    n = 1 << 30  # 1 GiB copied: read + written = 2 GiB moved
    a = torch.randn(n // 2, device="cuda", dtype=DT)
    b = torch.empty_like(a)
    t = ms(lambda: b.copy_(a))
    x = torch.randn(8192, 8192, device="cuda", dtype=DT)
    y = torch.randn(8192, 8192, device="cuda", dtype=DT)
    tm = ms(lambda: x @ y)
    return {"copy_GBps": 2 * n / t / 1e6, "matmul_bf16_TFLOPs": 2 * 8192**3 / tm / 1e9}


def make_paged(B, ctx, fp8=False, table_len=None):
    """Random paged K/V for B sequences of ctx tokens with shuffled block tables (``table_len``
    positions wide: an engine graph's table spans max_model_len). FP8: e4m3 values of N(0, 1) / 0.05."""
    nb = math.ceil(ctx / BS)
    k_cache = torch.randn(B * nb, BS, HKV, D, device="cuda", dtype=DT)
    v_cache = torch.randn_like(k_cache)
    if fp8:
        k_cache, v_cache = quantize_fp8(k_cache, FP8_SCALE), quantize_fp8(v_cache, FP8_SCALE)
    bt = torch.randperm(B * nb, device="cuda").view(B, nb).int()
    if table_len:
        bt = torch.cat([bt, torch.zeros(B, math.ceil(table_len / BS) - nb, dtype=torch.int32, device="cuda")], 1)
    return k_cache, v_cache, bt


def contiguous(cache, bt, ctx):
    """[B, HKV, ctx, D] bf16 copy of the paged cache (dequantised if FP8), for SDPA."""
    B = bt.shape[0]
    nb = math.ceil(ctx / BS)
    if cache.dtype == torch.float8_e4m3fn:
        cache = cache.to(DT) * FP8_SCALE
    return cache[bt[:, :nb].long()].view(B, -1, HKV, D)[:, :ctx].transpose(1, 2).contiguous()


def sdpa_variants(q, k, v, causal, allow_repeat):
    """{name: fn} of SDPA over contiguous K/V: native GQA, and K/V repeated to H heads if memory allows."""
    out = {"sdpa_enable_gqa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)}
    if allow_repeat:
        kr, vr = k.repeat_interleave(H // HKV, 1), v.repeat_interleave(H // HKV, 1)
        out["sdpa_repeat_interleave"] = lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=causal)
    return out


def graph_plan_len(attn, B, ctx, graph_max_len, fp8) -> int:
    """The max_seq_len an engine graph of B sequences at ctx plans with, for a model of graph_max_len:
    the shortest of its kernels' decode_graph_lengths >= ctx (the limit for a tree without them)."""
    lengths = attn.__globals__.get("decode_graph_lengths")  # the attn's own tree (a --baseline's too)
    if lengths is None:
        return graph_max_len
    return min(n for n in lengths(B, H, HKV, D, graph_max_len, torch.device("cuda"), fp8) if n >= ctx)


def bench_decode(B, ctx, copy_gbps, plan_overrides=None, with_sdpa=True, fp8=False, graph_max_len=None,
                 attn=paged_attention):
    """One decode step over B sequences of ctx tokens, as a graph replay. graph_max_len: as the engine's
    graphs run it for a model of that limit (block tables that wide, the plan of graph_plan_len)."""
    kv_bytes = 2 * B * ctx * HKV * D * (1 if fp8 else 2)
    if 1.15 * kv_bytes > free_bytes():
        return {"B": B, "ctx": ctx, "skipped": f"paged K/V of {kv_bytes / 1e9:.1f} GB does not fit"}
    k_cache, v_cache, bt = make_paged(B, ctx, fp8, graph_max_len)
    q = torch.randn(B, H, D, device="cuda", dtype=DT)
    qsl = torch.arange(B + 1, device="cuda", dtype=torch.int32)
    lens = torch.full((B,), ctx, device="cuda", dtype=torch.int32)
    out = torch.empty_like(q)
    scales = {"k_scale": FP8_SCALE, "v_scale": FP8_SCALE} if fp8 else {}

    plan_len = graph_plan_len(attn, B, ctx, graph_max_len, fp8) if graph_max_len else ctx

    def ours():
        return attn(q, k_cache, v_cache, bt, qsl, lens, 1, plan_len, D ** -0.5, out=out,
                    plan_overrides=plan_overrides, **scales)

    t = graph_ms(ours)
    moved = kv_bytes + 2 * q.numel() * 2
    row = {"B": B, "ctx": ctx, "ms": t, "GBps": moved / t / 1e6, "pct_copy": 100 * moved / t / 1e6 / copy_gbps}
    if fp8:
        row["kv_cache"] = "fp8_e4m3"
    if graph_max_len:
        row["graph_max_len"], row["graph_plan_len"] = graph_max_len, plan_len
    if (2 if fp8 else 1) * 1.6 * kv_bytes > free_bytes():  # contiguous bf16 K/V plus the gather's temporary
        row["sdpa"] = "skipped: no room for a contiguous copy of K/V"
        return row
    kc, vc = contiguous(k_cache, bt, ctx), contiguous(v_cache, bt, ctx)
    allow_repeat = False  # K/V repeated to 32 heads: 3.7x slower than enable_gqa at every decode shape run
    qs = q.view(B, H, 1, D)
    best = None
    for name, fn in sdpa_variants(qs, kc, vc, False, allow_repeat).items():
        out.fill_(float("nan"))
        err = rel_err(ours().view(B, H, 1, D), fn())
        assert err < 2e-2, f"decode B={B} ctx={ctx}: ours vs {name} rel err {err:.2e}"
        row["rel_err_vs_sdpa"] = err
        if not with_sdpa:
            return row  # checked, not timed
        ts = graph_ms(fn)
        row[name + "_ms"] = ts
        if best is None or ts < best[1]:
            best = (name, ts)
    row["sdpa_best"], row["vs_sdpa"] = best[0], best[1] / t  # > 1: ours faster
    return row


def bench_prefill(B, ctx, plan_overrides=None, with_sdpa=True, attn=paged_attention, fresh_kv=True):
    """A causal prefill of B prompts of ctx tokens whose K/V are in the paged cache. fresh_kv: hand the
    prompts' K/V to the kernel too, as the engine does (kernels/prefill_attention.py: the chunk's K/V
    through TMA); the block-table programs are timed beside it (``block_table_ms``)."""
    k_cache, v_cache, bt = make_paged(B, ctx)
    q = torch.randn(B * ctx, H, D, device="cuda", dtype=DT)
    qsl = torch.arange(0, B * ctx + 1, ctx, device="cuda", dtype=torch.int32)
    lens = torch.full((B,), ctx, device="cuda", dtype=torch.int32)
    out = torch.empty_like(q)
    kc, vc = contiguous(k_cache, bt, ctx), contiguous(v_cache, bt, ctx)
    fresh = {}
    takes = inspect.signature(attn).parameters  # a --baseline tree's launcher may predate some
    if fresh_kv and plan_overrides is None and "key" in takes:
        # [B, HKV, ctx, D] -> [B * ctx, HKV, D], as the engine's k/v rows of the q|k|v projection
        # (contiguous: at B=1 the reshape is a view whose heads are ctx rows apart, which the path refuses).
        # A --baseline tree's launcher gets them too, so that its row is its engine path as well (until
        # 2026-12-02 it ran the block-table programs at every shape: 1.33x "speedups" at 8k).
        fresh = {name: c.transpose(1, 2).reshape(B * ctx, HKV, D).contiguous()
                 for name, c in (("key", kc), ("value", vc))}
        if "min_query_len" in takes:  # trees before 0b940dc lack it
            fresh["min_query_len"] = ctx  # the engine's eager steps say so (AttentionMetadata.min_query_len)
        if "max_prefix_len" in takes:  # fresh prompts, as the engine says for them (trees before 2026-12-02 lack it)
            fresh["max_prefix_len"] = 0

    def ours():
        return attn(q, k_cache, v_cache, bt, qsl, lens, ctx, ctx, D ** -0.5, out=out, plan_overrides=plan_overrides,
                    **fresh)

    def block_table():
        return attn(q, k_cache, v_cache, bt, qsl, lens, ctx, ctx, D ** -0.5, out=out, plan_overrides=plan_overrides)

    t = graph_ms(ours)
    flops = 4 * B * H * D * ctx * (ctx + 1) / 2  # QK^T and PV over the causal triangle
    row = {"B": B, "ctx": ctx, "ms": t, "TFLOPs": flops / t / 1e9}
    if attn is paged_attention:  # this tree's rule names the path (a baseline's may differ)
        takes_contiguous = fresh and prefill_attention_suits(q, fresh["key"], fresh["value"], out, k_cache, None,
                                                             ctx, ctx)
        row["path"] = "contiguous" if takes_contiguous else "block_table"
    if fresh:
        tb = graph_ms(block_table)
        row.update(block_table_ms=tb, block_table_TFLOPs=flops / tb / 1e9, vs_block_table=tb / t)
    qs = q.view(B, ctx, H, D).transpose(1, 2).contiguous()
    best = None
    for name, fn in sdpa_variants(qs, kc, vc, True, with_sdpa).items():
        for path in [ours] + ([block_table] if fresh else []):
            out.fill_(float("nan"))  # every element must be written again
            err = rel_err(path().view(B, ctx, H, D).transpose(1, 2), fn())
            assert err < 2e-2, f"prefill B={B} ctx={ctx} ({path.__name__}): ours vs {name} rel err {err:.2e}"
        row["rel_err_vs_sdpa"] = err
        if not with_sdpa:
            return row  # checked, not timed
        ts = graph_ms(fn)
        row[name + "_TFLOPs"] = flops / ts / 1e9
        if best is None or ts < best[1]:
            best = (name, ts)
    row["sdpa_best"], row["vs_sdpa"] = best[0], best[1] / t
    if fresh:
        row["block_table_vs_sdpa"] = best[1] / row["block_table_ms"]
    return row


def bench_fused(copy_gbps) -> list[dict]:
    rows = []
    T, hidden, inter = 4096, 4096, 14336

    def add(name, ours, eager, moved):
        assert rel_err(ours(), eager()) < 1e-2, name
        t, te = ms(ours), ms(eager)
        rows.append({"op": name, "ms": t, "eager_ms": te, "speedup": te / t, "GBps": moved / t / 1e6,
                     "pct_copy": 100 * moved / t / 1e6 / copy_gbps})

    x = torch.randn(T, hidden, device="cuda", dtype=DT)
    res = torch.randn_like(x)
    w = torch.randn(hidden, device="cuda", dtype=DT)

    def eager_rms():
        r = x + res
        rf = r.float()
        return w * (rf * torch.rsqrt(rf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(DT), r

    add("rms_norm+residual", lambda: rms_norm(x, w, 1e-5, res)[0], lambda: eager_rms()[0], 4 * x.numel() * 2)
    g = torch.randn(T, 2 * inter, device="cuda", dtype=DT)
    add("silu_and_mul", lambda: silu_and_mul(g), lambda: F.silu(g[:, :inter]) * g[:, inter:], 3 * T * inter * 2)
    qkv = torch.randn(T, (H + 2 * HKV) * D, device="cuda", dtype=DT)
    q, k = qkv[:, : H * D].view(T, H, D), qkv[:, H * D: (H + HKV) * D].view(T, HKV, D)
    inv_freq = 1.0 / (500000 ** (torch.arange(0, D, 2, device="cuda").float() / D))
    cache = build_cos_sin_cache(inv_freq, 8192, DT)
    pos = torch.randint(0, 8192, (T,), device="cuda")

    def eager_rope():  # the model's expression (engine_svc/model/llama.py apply_rope), out of place
        cos, sin = cache[pos].chunk(2, dim=-1)
        c, s = cos[:, None], sin[:, None]
        outs = []
        for t in (q, k):
            t1, t2 = t[..., : D // 2], t[..., D // 2:]
            outs.append(torch.cat((t1 * c - t2 * s, t2 * c + t1 * s), dim=-1))
        return torch.cat([o.flatten(1) for o in outs], 1)

    ref = eager_rope()  # before the in-place kernel rotates q and k
    got = torch.cat([t.flatten(1) for t in apply_rotary(q, k, pos, cache)], 1)
    assert rel_err(got, ref) < 1e-2, "rotary"
    t, te = ms(lambda: apply_rotary(q, k, pos, cache)), ms(eager_rope)
    moved = 2 * T * (H + HKV) * D * 2
    rows.append({"op": "rotary q+k", "ms": t, "eager_ms": te, "speedup": te / t, "GBps": moved / t / 1e6,
                 "pct_copy": 100 * moved / t / 1e6 / copy_gbps})
    kc = torch.randn(T // BS * 4, BS, HKV, D, device="cuda", dtype=DT)
    vc = torch.randn_like(kc)
    slots = torch.randperm(kc.shape[0] * BS, device="cuda")[:T]
    kn, vn = qkv[:, H * D: (H + HKV) * D].view(T, HKV, D), qkv[:, (H + HKV) * D:].view(T, HKV, D)

    def eager_write():
        kc.view(-1, HKV, D).index_copy_(0, slots, kn)
        vc.view(-1, HKV, D).index_copy_(0, slots, vn)

    t, te = ms(lambda: write_kv_cache(kn, vn, kc, vc, slots)), ms(eager_write)
    moved = 4 * T * HKV * D * 2
    rows.append({"op": "write_kv_cache", "ms": t, "eager_ms": te, "speedup": te / t, "GBps": moved / t / 1e6,
                 "pct_copy": 100 * moved / t / 1e6 / copy_gbps})
    return rows


BASELINE_DECODE = [(1, 512), (1, 2048), (1, 4096), (4, 4096), (8, 512), (8, 4096), (64, 4096), (256, 4096),
                   # lengths between the powers of 2 (round 6: splits of one tile, rounded up)
                   (1, 600), (1, 1500), (1, 3000), (2, 900), (4, 700), (4, 2500), (8, 700)]
BASELINE_PREFILL = [(1, 2048), (1, 8192), (8, 2048)]


def load_baseline(tree):
    """paged_attention of another checkout (the base commit) with that checkout's own kernels package:
    the modules are imported from ``tree`` and then taken out of sys.modules again, so this tree's
    ``kernels`` stays what everything else imports (the base's functions keep their own globals)."""
    import importlib
    import sys
    ours = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "kernels" or k.startswith("kernels.")}
    sys.path.insert(0, os.path.abspath(tree))
    try:
        fn = importlib.import_module("kernels.paged_attention").paged_attention
    finally:
        sys.path.remove(os.path.abspath(tree))
        for k in [k for k in sys.modules if k == "kernels" or k.startswith("kernels.")]:
            del sys.modules[k]
        sys.modules.update(ours)
    return fn


def bench_baseline(tree, copy_gbps) -> dict:
    """Base and this tree's kernels on the same shapes, alternating, in this one run."""
    base = load_baseline(tree)
    rows = {"decode": [], "prefill": []}
    for B, ctx in BASELINE_DECODE:
        a = bench_decode(B, ctx, copy_gbps, with_sdpa=False, attn=base)
        b = bench_decode(B, ctx, copy_gbps, with_sdpa=False)
        rows["decode"].append({"B": B, "ctx": ctx, "base_ms": a.get("ms"), "ms": b.get("ms"),
                               "speedup": a["ms"] / b["ms"] if "ms" in a and "ms" in b else None})
        if B <= 8:  # and as the engine's graphs plan it (max_seq_len = the model's limit)
            a = bench_decode(B, ctx, copy_gbps, with_sdpa=False, attn=base, graph_max_len=ENGINE_MAX_LEN)
            b = bench_decode(B, ctx, copy_gbps, with_sdpa=False, graph_max_len=ENGINE_MAX_LEN)
            rows["decode"][-1].update(engine_graph_base_ms=a["ms"], engine_graph_ms=b["ms"],
                                      engine_graph_speedup=a["ms"] / b["ms"])
        print("baseline decode", rows["decode"][-1], flush=True)
    for B, ctx in BASELINE_PREFILL:
        a = bench_prefill(B, ctx, with_sdpa=False, attn=base)
        b = bench_prefill(B, ctx, with_sdpa=False)
        rows["prefill"].append({"B": B, "ctx": ctx, "base_ms": a["ms"], "ms": b["ms"], "base_TFLOPs": a["TFLOPs"],
                                "TFLOPs": b["TFLOPs"], "speedup": a["ms"] / b["ms"]})
        print("baseline prefill", rows["prefill"][-1], flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sweep", action="store_true", help="also time tile/warp/stage/split variants")
    ap.add_argument("--sweep-only", action="store_true", help="only the variants (bench/kernels_sweep.py)")
    ap.add_argument("--baseline", help="another checkout whose paged attention is timed beside this one")
    ap.add_argument("--pick", action="store_true", help="time tile candidates first and run with the fastest")
    ap.add_argument("--sections", default="decode,decode_fp8,prefill,fused",
                    help="which tables to time (a comma list of decode, decode_fp8, prefill, fused)")
    ap.add_argument("--mid-splits", action="store_true",
                    help="time forced split counts at batch sizes 16-128 (bench/kernels_sweep.py)")
    ap.add_argument("--engine-tiles-only", action="store_true",
                    help="only decode tile candidates at the engine's shapes (bench/kernels_sweep.py)")
    args = ap.parse_args()
    torch.manual_seed(0)
    commit = os.environ.get("KVMESH_COMMIT", "")  # the device copy of the tree may have no git history
    if not commit:
        try:
            out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
            commit = out if len(out) == 40 else ""
        except OSError:
            pass
    report = {
        "device": torch.cuda.get_device_name(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "git_commit": commit or "unknown", "torch": torch.__version__,
        "triton": triton.__version__, "shape": {"H": H, "HKV": HKV, "D": D, "block_size": BS, "dtype": "bfloat16"},
        "timing": "attention: CUDA-graph replay, fused layers: eager calls; triton.testing.do_bench median, "
                  "warmup 25 ms, rep 100 ms, L2 cleared before every repetition",
    }
    report["ceilings"] = ceilings()
    cbw = report["ceilings"]["copy_GBps"]

    def save():  # after every section, so a failure late in the run keeps what was measured
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)

    print(f"{report['device']}  copy {cbw:.0f} GB/s  matmul {report['ceilings']['matmul_bf16_TFLOPs']:.0f} TFLOP/s",
          flush=True)
    if args.engine_tiles_only:
        from kernels_sweep import engine_decode_tiles  # bench/kernels_sweep.py
        report["engine_decode_tiles"] = engine_decode_tiles(cbw, bench_decode)
        save()
        return
    if args.sweep or args.sweep_only:
        from kernels_sweep import print_sweep, sweep  # bench/kernels_sweep.py
        report["sweep"] = sweep(cbw, bench_decode, bench_prefill)
        save()
        if args.sweep_only:
            print_sweep(report["sweep"])
            return
    if args.pick:
        from kernels_sweep import pick  # bench/kernels_sweep.py
        report["pick"] = pick(cbw, bench_decode, bench_prefill)
        save()
    if args.baseline:
        report["baseline"] = bench_baseline(args.baseline, cbw)
        save()
    if args.mid_splits:
        from kernels_sweep import mid_batch_splits  # bench/kernels_sweep.py
        report["mid_splits"] = mid_batch_splits(cbw, bench_decode)
        save()
    sections = set(args.sections.split(","))
    if "decode" in sections:
        report["decode"] = []
        for B in BATCHES:
            for ctx in CONTEXTS:
                row = bench_decode(B, ctx, cbw)
                if B <= 64 and "ms" in row:  # as the engine's graphs plan it: max_seq_len = the model's limit
                    row["engine_graph_ms"] = bench_decode(B, ctx, cbw, with_sdpa=False,
                                                          graph_max_len=ENGINE_MAX_LEN)["ms"]
                if "ms" in row:  # same run: splits over contiguous shares, the first tile after the length
                    row["contiguous_splits_ms"] = bench_decode(B, ctx, cbw, {"strided": False}, with_sdpa=False)["ms"]
                report["decode"].append(row)
                print("decode", report["decode"][-1], flush=True)
        save()
    if "decode_fp8" in sections:
        report["decode_fp8"] = [bench_decode(B, ctx, cbw, fp8=True) for B, ctx in FP8_DECODE_SHAPES]
        for r in report["decode_fp8"]:  # same run: the tiles converted to bf16 (as before 2026-12-01 round 4)
            if "ms" in r:
                r["via_bf16_ms"] = bench_decode(r["B"], r["ctx"], cbw, {"fp8_via_f16": False}, with_sdpa=False,
                                                fp8=True)["ms"]
        for r in report["decode_fp8"]:
            print("decode fp8", r, flush=True)
        save()
    if "prefill" in sections:
        report["prefill"] = []
        for B in BATCHES:
            for ctx in CONTEXTS:
                if B * ctx > PREFILL_MAX_TOKENS:
                    report["prefill"].append({"B": B, "ctx": ctx, "skipped": f"B*ctx > {PREFILL_MAX_TOKENS}"})
                    continue
                report["prefill"].append(bench_prefill(B, ctx))
                print("prefill", report["prefill"][-1], flush=True)
        save()
    if "fused" in sections:
        report["fused"] = bench_fused(cbw)
        save()
    print_table(report)


def print_table(r):
    print(f"\n{r['device']}  torch {r['torch']}  triton {r['triton']}  commit {r['git_commit'][:10]}")
    print(f"copy bandwidth {r['ceilings']['copy_GBps']:.0f} GB/s (read+write), "
          f"bf16 matmul {r['ceilings']['matmul_bf16_TFLOPs']:.0f} TFLOP/s")
    if "pick" in r:
        print("in-run pick:", r["pick"]["picked"])
        for kind in ("decode", "decode_fp8", "prefill"):
            for x in r["pick"][kind]:
                print(f"  {kind:<8} {x['variant']}  " + " ".join(f"{y.get('ms', float('nan')):.4f}" for y in x["rows"]))
    print("\ndecode (32q/8kv heads, d=128, bf16)    ms     GB/s  %copy  SDPA-best/ours  (which SDPA)")
    for x in r.get("decode", []):
        if "skipped" in x:
            print(f"  B={x['B']:>3} ctx={x['ctx']:>5}  skipped: {x['skipped']}")
            continue
        vs = f"{x['vs_sdpa']:.2f}x ({x['sdpa_best']})" if "vs_sdpa" in x else x.get("sdpa", "")
        g = f"  engine-graph plan {x['engine_graph_ms']:.4f} ms" if "engine_graph_ms" in x else ""
        if "contiguous_splits_ms" in x:
            g += f"  contiguous splits {x['contiguous_splits_ms'] * 1000:.1f} us"
        print(f"  B={x['B']:>3} ctx={x['ctx']:>5}  {x['ms']:8.4f} {x['GBps']:8.0f} {x['pct_copy']:5.1f}%  {vs}{g}")
    print("\ndecode, FP8 (e4m3) cache: bytes are half the bf16 rows'; SDPA runs on a bf16 copy")
    for x in r.get("decode_fp8", []):
        if "skipped" in x:
            print(f"  B={x['B']:>3} ctx={x['ctx']:>5}  skipped: {x['skipped']}")
            continue
        vs = f"{x['vs_sdpa']:.2f}x ({x['sdpa_best']})" if "vs_sdpa" in x else x.get("sdpa", "")
        print(f"  B={x['B']:>3} ctx={x['ctx']:>5}  {x['ms']:8.3f} {x['GBps']:8.0f} {x['pct_copy']:5.1f}%  {vs}")
    print("\nprefill (causal), the engine's path      ms   TFLOP/s  SDPA-best/ours  (which SDPA)   block-table kernel")
    for x in r.get("prefill", []):
        if "skipped" in x:
            print(f"  B={x['B']:>3} ctx={x['ctx']:>5}  skipped: {x['skipped']}")
            continue
        bt = (f"   {x['block_table_TFLOPs']:.1f} TFLOP/s, {x['block_table_vs_sdpa']:.2f}x SDPA"
              if "block_table_ms" in x else "")
        print(f"  B={x['B']:>3} ctx={x['ctx']:>5}  {x['ms']:8.3f} {x['TFLOPs']:8.1f}  {x['vs_sdpa']:.2f}x ({x['sdpa_best']}){bt}")
    if "baseline" in r:
        print("\nbase commit's kernel vs this one (same run)    base ms    ms   speedup")
        for kind in ("decode", "prefill"):
            for x in r["baseline"][kind]:
                print(f"  {kind:<8} B={x['B']:>3} ctx={x['ctx']:>5}  {x['base_ms']:9.4f} {x['ms']:8.4f}  {x['speedup']:.3f}x")
    print("\nfused layers (T=4096, bf16)        ms   eager ms  speedup   GB/s  %copy")
    for x in r.get("fused", []):
        print(f"  {x['op']:<20} {x['ms']:8.4f} {x['eager_ms']:9.4f} {x['speedup']:7.2f}x {x['GBps']:7.0f} {x['pct_copy']:5.1f}%")


if __name__ == "__main__":
    main()
