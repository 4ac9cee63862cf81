"""Variants of the paged-attention plan timed in one run of bench/kernels.py (--sweep / --sweep-only):
prefill tiles, decode tiles, and split counts for small decode batches. Their results set
PREFILL_TILES and the split heuristic in kernels/paged_attention.py (see bench/KERNELS_NOTES.md)."""

from __future__ import annotations

# (BLOCK_M, TILE_N, warps, stages[, K loaded as rows]) for prefill; 8 warps = two warpgroups
PREFILL_VARIANTS = [(64, 64, 4, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4),
                    (64, 128, 4, 3), (64, 64, 4, 4), (128, 128, 8, 3, True), (64, 64, 4, 3, True)]
PREFILL_SHAPES = [(1, 8192), (8, 2048)]
DECODE_VARIANTS = [(128, 4, 4), (128, 4, 3), (64, 4, 3), (256, 8, 3), (64, 4, 4)]  # (TILE_N, warps, stages)
SMALL_BATCHES = [1, 2, 4, 8]
SMALL_CONTEXTS = [512, 2048, 4096, 8192]
SPLITS = [None, 1, 4, 8, 16, 32, 64]  # None = the heuristic


def sweep(copy_gbps, bench_decode, bench_prefill) -> dict:
    res = {"prefill": [], "decode_tiles": [], "decode_splits": [], "decode_graph_plan": []}

    def run(kind, fn, po):
        try:
            r = fn()
        except Exception as e:  # out of shared memory, a compile error: record and go on
            r = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        res[kind].append({"variant": po, **r})
        print("sweep", kind, po, {k: r.get(k) for k in ("B", "ctx", "ms", "TFLOPs", "pct_copy", "vs_sdpa", "error")},
              flush=True)

    for v in PREFILL_VARIANTS:
        po = {"block_m": v[0], "tile_n": v[1], "num_warps": v[2], "num_stages": v[3], "k_rows": len(v) > 4}
        for B, ctx in PREFILL_SHAPES:
            run("prefill", lambda: bench_prefill(B, ctx, po, with_sdpa=v == PREFILL_VARIANTS[0]), po)
    for tile_n, warps, stages in DECODE_VARIANTS:
        po = {"block_m": 16, "tile_n": tile_n, "num_warps": warps, "num_stages": stages, "num_splits": 1}
        run("decode_tiles", lambda: bench_decode(64, 4096, copy_gbps, po, with_sdpa=tile_n == 128 and stages == 4), po)
    for B in SMALL_BATCHES:
        for ctx in SMALL_CONTEXTS:
            for n in SPLITS:
                po = {} if n is None else {"num_splits": n, "min_seg": 128}  # exact shares
                run("decode_splits", lambda: bench_decode(B, ctx, copy_gbps, po or None, with_sdpa=n is None), po)
    for B in SMALL_BATCHES:  # as the engine's graphs plan them (graph_plan_len), splits cut on the device
        for ctx in (512, 4096):
            run("decode_graph_plan", lambda: bench_decode(B, ctx, copy_gbps, None, with_sdpa=False,
                                                          graph_max_len=131072), {"graph_max_len": 131072})
    return res


# Batches between the small ones (split by the heuristic) and 256: one pass today, and at B=64 a
# wave-quantisation tail (512 programs on ~396 slots, bench/KERNELS_NOTES.md round 2). With the merge
# done by the last split there is no second launch, so splitting them may pay now.
MID_BATCHES = [16, 32, 48, 64, 96, 128]
MID_CONTEXTS = [1024, 2048, 4096, 8192]
MID_SPLITS = [1, 2, 3, 4]  # 3: B=64's 1536 programs fill 3.88 of 4 waves of 396 slots


def mid_batch_splits(copy_gbps, bench_decode) -> list[dict]:
    """ms per forced split count at the middle batch sizes (SDPA timed beside one pass)."""
    rows = []
    for B in MID_BATCHES:
        for ctx in MID_CONTEXTS:
            for n in MID_SPLITS:
                r = bench_decode(B, ctx, copy_gbps, {"num_splits": n, "min_seg": 128}, with_sdpa=n == 1)
                rows.append({"num_splits": n, **r})
                print("mid splits", {k: r.get(k) for k in ("B", "ctx", "ms", "pct_copy", "vs_sdpa")}, "splits", n,
                      flush=True)
    return rows


def print_sweep(res) -> None:
    print("\nprefill variants                       B   ctx     ms   TFLOP/s")
    for r in res["prefill"]:
        v = r["variant"]
        name = f"{v['block_m']}x{v['tile_n']} w{v['num_warps']} s{v['num_stages']}{' krows' if v['k_rows'] else ''}"
        print(f"  {name:<30} {r.get('B', ''):>4} {r.get('ctx', ''):>5} {r.get('ms', 0):8.3f} {r.get('TFLOPs', 0):8.1f}"
              f"  {r.get('vs_sdpa', '')} {r.get('error', '')}")
    print("\ndecode B=64 ctx=4096 tiles             ms    %copy")
    for r in res["decode_tiles"]:
        v = r["variant"]
        print(f"  {v['tile_n']} w{v['num_warps']} s{v['num_stages']:<20} {r.get('ms', 0):8.4f} {r.get('pct_copy', 0):6.1f}"
              f"  {r.get('vs_sdpa', '')} {r.get('error', '')}")
    print("\nsmall-batch decode: ms per split count (h = heuristic), SDPA ms")
    cells = {}
    for r in res["decode_splits"]:
        cells.setdefault((r.get("B"), r.get("ctx")), []).append(r)
    for (B, ctx), rows in cells.items():
        h = rows[0]
        sd = h.get("sdpa_enable_gqa_ms", float("nan"))
        line = " ".join(f"{r['variant'].get('num_splits', 'h')}:{r.get('ms', float('nan')) * 1000:.1f}" for r in rows)
        print(f"  B={B} ctx={ctx:<5} us {line}  sdpa {sd * 1000:.1f}  vs_sdpa(h) {h.get('vs_sdpa', float('nan')):.2f}")
    print("\nengine-graph plan (max_seq_len 131072)  ms")
    for r in res["decode_graph_plan"]:
        print(f"  B={r.get('B')} ctx={r.get('ctx')}  {r.get('ms', 0) * 1000:.1f} us {r.get('error', '')}")


# --pick: candidates timed before the main grid; the fastest is used for the rest of the run (the JSON
# records which), so the table committed afterwards is the one the run measured.
DECODE_PICK = [(128, 4, 4), (128, 4, 5), (64, 4, 6), (64, 4, 4), (256, 8, 3), (128, 8, 4)]
DECODE_PICK_SHAPES = [(64, 4096), (256, 4096)]
DECODE_PICK_FP8 = [(128, 4, 4), (256, 8, 3), (128, 4, 6), (256, 4, 3), (128, 8, 4), (64, 4, 6)]  # f16 tiles (round 4)
PREFILL_PICK = [(128, 128, 8, 3), (128, 128, 8, 4), (128, 64, 8, 3)]  # K as rows
PREFILL_PICK_SHAPES = [(1, 8192), (8, 2048)]


# The decode shapes the engine spends its time on in the issue-10 mix (bench/step_profile.py windows),
# where the engine's decode attention runs at 70-79% of copy bandwidth (the pick above is at ctx 4096).
ENGINE_DECODE_SHAPES = [(256, 512), (200, 512), (64, 1024), (16, 2048)]
ENGINE_DECODE_TILES = DECODE_PICK + [(64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 4, 3), (32, 4, 3)]


def engine_decode_tiles(copy_gbps, bench_decode) -> dict:
    """Time decode tile candidates at the engine's shapes (no table is changed: for the notes)."""
    out = []
    for tile_n, warps, stages in ENGINE_DECODE_TILES:
        po = {"tile_n": tile_n, "num_warps": warps, "num_stages": stages}
        try:
            rows = [bench_decode(B, ctx, copy_gbps, po, with_sdpa=False) for B, ctx in ENGINE_DECODE_SHAPES]
        except Exception as e:  # out of shared memory, a compile error: record and go on
            rows = [{"error": f"{type(e).__name__}: {str(e)[:200]}"}]
        out.append({"variant": po, "rows": rows, "total_ms": sum(r.get("ms", 1e9) for r in rows)})
        print("engine decode tiles", po, [(r.get("B"), r.get("ctx"), round(r.get("ms", 0), 4),
                                           round(r.get("pct_copy", 0), 1)) for r in rows], flush=True)
    best = min(out, key=lambda x: x["total_ms"])
    print("fastest over the engine's shapes:", best["variant"], round(best["total_ms"], 4), "ms", flush=True)
    return {"shapes": ENGINE_DECODE_SHAPES, "variants": out, "fastest": best["variant"]}


def pick(copy_gbps, bench_decode, bench_prefill) -> dict:
    """Time the candidates, set the fastest (summed ms over the shapes) into the kernels' tables."""
    import kernels.paged_attention as pa
    out = {"decode": [], "prefill": []}
    for tile_n, warps, stages in DECODE_PICK:
        po = {"tile_n": tile_n, "num_warps": warps, "num_stages": stages}
        rows = [bench_decode(B, ctx, copy_gbps, po, with_sdpa=False) for B, ctx in DECODE_PICK_SHAPES]
        out["decode"].append({"variant": po, "rows": rows, "total_ms": sum(r.get("ms", 1e9) for r in rows)})
        print("pick decode", po, [round(r.get("ms", 0), 4) for r in rows], flush=True)
    out["decode_fp8"] = []
    for tile_n, warps, stages in DECODE_PICK_FP8:
        po = {"tile_n": tile_n, "num_warps": warps, "num_stages": stages}
        rows = [bench_decode(B, ctx, copy_gbps, po, with_sdpa=False, fp8=True) for B, ctx in DECODE_PICK_SHAPES]
        out["decode_fp8"].append({"variant": po, "rows": rows, "total_ms": sum(r.get("ms", 1e9) for r in rows)})
        print("pick decode fp8", po, [round(r.get("ms", 0), 4) for r in rows], flush=True)
    for bm, tn, warps, stages in PREFILL_PICK:
        po = {"block_m": bm, "tile_n": tn, "num_warps": warps, "num_stages": stages, "k_rows": True}
        try:
            rows = [bench_prefill(B, ctx, po, with_sdpa=False) for B, ctx in PREFILL_PICK_SHAPES]
        except Exception as e:  # out of shared memory: not a candidate
            rows = [{"error": f"{type(e).__name__}: {str(e)[:200]}"}]
        out["prefill"].append({"variant": po, "rows": rows, "total_ms": sum(r.get("ms", 1e9) for r in rows)})
        print("pick prefill", po, [round(r.get("ms", 0), 4) for r in rows], flush=True)
    d = min(out["decode"], key=lambda x: x["total_ms"])["variant"]
    p = min(out["prefill"], key=lambda x: x["total_ms"])["variant"]
    pa.DECODE_TILES[128] = (d["tile_n"], d["num_warps"], d["num_stages"])
    f = min(out["decode_fp8"], key=lambda x: x["total_ms"])["variant"]
    pa.DECODE_TILES_FP8[128] = (f["tile_n"], f["num_warps"], f["num_stages"])
    pa.PREFILL_TILES[128] = (p["block_m"], p["tile_n"], p["num_warps"], p["num_stages"])
    out["picked"] = {"DECODE_TILES[128]": pa.DECODE_TILES[128], "DECODE_TILES_FP8[128]": pa.DECODE_TILES_FP8[128],
                     "PREFILL_TILES[128]": pa.PREFILL_TILES[128]}
    print("picked", out["picked"], flush=True)
    return out
