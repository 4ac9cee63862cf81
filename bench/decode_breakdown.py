"""Where the microseconds of a small decode step's attention go: per-kernel device time and the span
from the first kernel's start to the last one's end (launch gaps included), ours against SDPA, as
CUDA-graph replays with the L2 cleared before each (as bench/kernels.py times them).

    python bench/decode_breakdown.py --out bench/results/decode-breakdown-<device>-<date>-<commit>.json

Why: at B=1-8 our decode is 1.5-4.5 us slower than SDPA's flash-decoding (0.76-0.91x,
bench/KERNELS_NOTES.md), and a fused merge made it slower, not faster: the split of that time
between the attention kernel, the merge and the gap between them decides what to change next.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib.util
import json
import os

import torch
import torch.nn.functional as F

# bench/kernels.py by path: its name is the repository's kernels package's
_spec = importlib.util.spec_from_file_location("bench_kernels", os.path.join(os.path.dirname(__file__), "kernels.py"))
bk = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bk)

SHAPES = [(1, 512), (1, 2048), (1, 8192), (4, 4096), (8, 512), (8, 2048)]
REPLAYS = 50


def profile_replays(graph: torch.cuda.CUDAGraph, flush: torch.Tensor) -> dict:
    """Kernel device time per replay by name (median over replays) and the replay's span."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPLAYS):
            flush.zero_()  # cold L2, as do_bench
            torch.cuda.synchronize()
            graph.replay()
            torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels.sort(key=lambda e: e.time_range.start)
    replays, cur = [], []
    for e in kernels:
        if "FillFunctor<signed char>" in e.name:  # the L2 flush between replays
            if cur:
                replays.append(cur)
            cur = []
            continue
        cur.append(e)
    if cur:
        replays.append(cur)
    by_name = collections.defaultdict(list)
    spans = []
    for r in replays:
        for e in r:
            by_name[e.name[:80]].append(e.time_range.elapsed_us())
        spans.append(r[-1].time_range.end - r[0].time_range.start)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {"replays": len(replays), "span_us": med(spans),
            "kernels_us": {k: med(v) for k, v in by_name.items()},
            "kernels_per_replay": round(sum(len(r) for r in replays) / max(1, len(replays)), 2)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    rows = []
    for B, ctx in SHAPES:
        k_cache, v_cache, bt = bk.make_paged(B, ctx, table_len=bk.ENGINE_MAX_LEN)
        q = torch.randn(B, bk.H, bk.D, device="cuda", dtype=torch.bfloat16)
        qsl = torch.arange(B + 1, device="cuda", dtype=torch.int32)
        lens = torch.full((B,), ctx, device="cuda", dtype=torch.int32)
        out = torch.empty_like(q)
        plan_len = bk.graph_plan_len(bk.paged_attention, B, ctx, bk.ENGINE_MAX_LEN, False)  # as the engine's graphs
        ours = bk.capture_graph(lambda: bk.paged_attention(q, k_cache, v_cache, bt, qsl, lens, 1, plan_len,
                                                           bk.D ** -0.5, out=out))
        kc, vc = bk.contiguous(k_cache, bt, ctx), bk.contiguous(v_cache, bt, ctx)
        qs = q.view(B, bk.H, 1, bk.D)
        sdpa = bk.capture_graph(lambda: F.scaled_dot_product_attention(qs, kc, vc, enable_gqa=True))
        row = {"B": B, "ctx": ctx, "ours": profile_replays(ours, flush), "sdpa": profile_replays(sdpa, flush)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del ours, sdpa, kc, vc, k_cache, v_cache
        torch.cuda.empty_cache()
    report = {"bench": "decode_breakdown", "device": torch.cuda.get_device_name(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "git_commit": os.environ.get("KVMESH_COMMIT", "unknown"), "torch": torch.__version__,
              "plan": "engine graphs: block tables 131072 positions wide, max_seq_len the engine's graph length for ctx", "rows": rows}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
