"""What causal prefill attention can Triton reach on this GPU when K/V are contiguous? (issue 11)

Our paged prefill kernel runs at 0.61-0.70x SDPA on the H200 (KERNELS_NOTES round 2). Before
rewriting it, this measures the ceiling of the obvious alternative: a FlashAttention-2-style kernel,
one query head per program (not our GQA-packed rows), over contiguous K/V, in three forms that differ
only in how tiles reach shared memory:

- ``tma``: host tensor descriptors (TMA loads, as the Triton fused-attention tutorial on sm_90),
- ``tma_ws``: the same with ``tl.range(..., warp_specialize=True)`` (recorded as an error if Triton
  does not support it on this GPU),
- ``ptr``: plain pointer loads from the same contiguous tensors (cp.async),

beside SDPA (FlashAttention / cuDNN) and our paged kernel at the same shapes, in the same run.
Reading: if ``tma`` reaches ~0.9x SDPA and ``ptr`` does not, the engine's prefill should read the
chunk's own K/V contiguously through descriptors (the fresh tokens are contiguous in the q|k|v
projection's output) and only the cached prefix through the block table.

    python bench/prefill_probe.py [--shapes 1x2048,1x8192] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.kernels import D, DT, H, HKV, bench_prefill, contiguous, graph_ms, make_paged, rel_err  # noqa: E402
from kernels.prefill_attention import prefill_attention  # noqa: E402
from bench.harness import save_report  # noqa: E402

GROUP = H // HKV
LOG2E = 1.4426950408889634
CONFIGS = [  # (form, BLOCK_M, BLOCK_N, num_warps, num_stages)
    ("tma", 128, 128, 8, 2), ("tma", 128, 128, 8, 3), ("tma", 128, 64, 4, 3), ("tma", 128, 64, 8, 3),
    ("tma", 128, 64, 4, 4), ("tma", 64, 64, 4, 3),
    ("tma_ws", 128, 128, 8, 2), ("tma_ws", 128, 64, 4, 3), ("tma_ws", 128, 128, 4, 2),
    ("ptr", 128, 128, 8, 3), ("ptr", 128, 64, 4, 3),
]


@triton.jit
def _step(acc, m_i, l_i, q, k_t, v, scale_log2, offs_m, offs_n, MASKED: tl.constexpr):
    s = tl.dot(q, k_t)
    if MASKED:
        s = tl.where(offs_m[:, None] >= offs_n[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
        p = tl.math.exp2(s * scale_log2 - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def _kv_tile(k_desc, v_desc, k_ptr, v_ptr, row0, start_n, offs_n, kvh, row_stride, D: tl.constexpr,
             TMA: tl.constexpr):
    """K^T and V of keys [start_n, start_n + BLOCK_N) of one KV head: TMA boxes or pointer loads."""
    if TMA:
        return k_desc.load([row0 + start_n, kvh * D]).T, v_desc.load([row0 + start_n, kvh * D])
    kv_off = (row0 + offs_n)[:, None] * row_stride + kvh * D + tl.arange(0, D)[None, :]
    return tl.trans(tl.load(k_ptr + kv_off)), tl.load(v_ptr + kv_off)


@triton.jit
def _probe_kernel(q_desc, k_desc, v_desc, o_desc, q_ptr, k_ptr, v_ptr, o_ptr, ctx, scale_log2,
                  H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr):
    """Program (q-block, batch*head): rows [start_m, start_m + BLOCK_M) of one head; heavy first.
    q/o: [B*ctx, H*D], k/v: [B*ctx, HKV*D] row-major; ctx is a multiple of BLOCK_M and BLOCK_N."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kvh = h // GROUP
    row0 = b * ctx
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    if TMA:
        q = q_desc.load([row0 + start_m, h * D])
    else:
        q = tl.load(q_ptr + (row0 + offs_m)[:, None] * (H * D) + h * D + offs_d[None, :])
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in tl.range(0, start_m, BLOCK_N, warp_specialize=WS):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_t, v = _kv_tile(k_desc, v_desc, k_ptr, v_ptr, row0, start_n, offs_n, kvh, H // GROUP * D, D, TMA)
        acc, m_i, l_i = _step(acc, m_i, l_i, q, k_t, v, scale_log2, offs_m, offs_n, False)
    for start_n in tl.range(start_m, start_m + BLOCK_M, BLOCK_N):  # the diagonal, masked
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_t, v = _kv_tile(k_desc, v_desc, k_ptr, v_ptr, row0, start_n, offs_n, kvh, H // GROUP * D, D, TMA)
        acc, m_i, l_i = _step(acc, m_i, l_i, q, k_t, v, scale_log2, offs_m, offs_n, True)
    o = (acc / l_i[:, None]).to(q.dtype)
    if TMA:
        o_desc.store([row0 + start_m, h * D], o)
    else:
        tl.store(o_ptr + (row0 + offs_m)[:, None] * (H * D) + h * D + offs_d[None, :], o)


def probe(q, k, v, out, B, ctx, form, bm, bn, warps, stages):
    from triton.tools.tensor_descriptor import TensorDescriptor

    tma = form.startswith("tma")
    descs = [TensorDescriptor.from_tensor(t, [bm if t is q or t is out else bn, D]) for t in (q, k, v, out)] \
        if tma else [q, k, v, out]  # ignored by the ptr form
    grid = (ctx // bm, B * H)
    return _probe_kernel[grid](*descs, q, k, v, out, ctx, D ** -0.5 * LOG2E, H=H, GROUP=GROUP, D=D,
                               BLOCK_M=bm, BLOCK_N=bn, TMA=tma, WS=form == "tma_ws",
                               num_warps=warps, num_stages=stages)


def run_shape(B, ctx) -> dict:
    flops = 4 * B * H * D * ctx * (ctx + 1) / 2
    q = torch.randn(B * ctx, H * D, device="cuda", dtype=DT)
    k = torch.randn(B * ctx, HKV * D, device="cuda", dtype=DT)
    v = torch.randn_like(k)
    out = torch.empty_like(q)
    qs = q.view(B, ctx, H, D).transpose(1, 2)
    ks, vs = (t.view(B, ctx, HKV, D).transpose(1, 2) for t in (k, v))
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)  # noqa: E731
    ref = sdpa()
    t_sdpa = graph_ms(sdpa)
    row = {"B": B, "ctx": ctx, "sdpa_ms": t_sdpa, "sdpa_TFLOPs": flops / t_sdpa / 1e9, "forms": []}
    paged = bench_prefill(B, ctx, with_sdpa=False, fresh_kv=False)
    row["paged_ms"] = paged["ms"]
    row["paged_vs_sdpa"] = t_sdpa / paged["ms"]
    for form, bm, bn, warps, stages in CONFIGS:
        cfg = {"form": form, "BLOCK_M": bm, "BLOCK_N": bn, "warps": warps, "stages": stages}
        try:
            out.fill_(float("nan"))
            probe(q, k, v, out, B, ctx, form, bm, bn, warps, stages)
            err = rel_err(out.view(B, ctx, H, D).transpose(1, 2), ref)
            assert err < 2e-2, f"rel err {err:.2e}"
            t = graph_ms(lambda: probe(q, k, v, out, B, ctx, form, bm, bn, warps, stages))
            cfg.update(ms=t, TFLOPs=flops / t / 1e9, vs_sdpa=t_sdpa / t, rel_err=err)
        except Exception as e:  # a form this Triton / GPU cannot compile is a finding, not a crash
            cfg["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        row["forms"].append(cfg)
        print(B, ctx, cfg, flush=True)
    return row


ENGINE_VARIANTS = [{}, {"PREFIX": False}]  # the defaults, and the prefix loop compiled out
# (ddf20df also timed a persistent grid, since removed: prefill-probe-*-ddf20df-persistent.log)
# (cf61666 swept STATIC_DIAG / TMA_STORE alone and together and 128x64 tiles: prefill-probe-*-cf61666-variants.json)
ENGINE_TILES = [(64, 64, 4, 3), (128, 128, 8, 3)]


def engine_kernel_rows(B, ctx, prefix, tiles_list=ENGINE_TILES, variants=ENGINE_VARIANTS) -> list[dict]:
    """kernels/prefill_attention.py at B prompts of ctx tokens whose first ``prefix`` tokens are cached
    (read through the block table), the rest this chunk's (through TMA), against SDPA over all of it."""
    k_cache, v_cache, bt = make_paged(B, ctx)
    kc, vc = contiguous(k_cache, bt, ctx), contiguous(v_cache, bt, ctx)  # [B, HKV, ctx, D]
    chunk = ctx - prefix
    q_full = torch.randn(B, H, ctx, D, device="cuda", dtype=DT)
    ref = torch.nn.functional.scaled_dot_product_attention(q_full, kc, vc, is_causal=True, enable_gqa=True)
    ref = ref[:, :, prefix:]
    q = q_full[:, :, prefix:].transpose(1, 2).reshape(B * chunk, H, D).contiguous()
    key, value = (c[:, :, prefix:].transpose(1, 2).reshape(B * chunk, HKV, D).contiguous() for c in (kc, vc))
    qsl = torch.arange(0, B * chunk + 1, chunk, device="cuda", dtype=torch.int32)
    lens = torch.full((B,), ctx, device="cuda", dtype=torch.int32)
    out = torch.empty_like(q)
    flops = 4 * B * H * D * (chunk * prefix + chunk * (chunk + 1) / 2)
    rows = []
    for tiles in tiles_list:
        for variant in variants:
            if prefix and variant.get("PREFIX") is False:
                continue
            row = {"B": B, "ctx": ctx, "prefix": prefix, "tiles": list(tiles), "variant": variant}

            # max_query_len picks the defaults of the tiles' class (LONG_CHUNK_VARIANT for 128x128)
            mql = chunk if tiles[0] == 64 else max(chunk, 2049)

            def call():
                return prefill_attention(q, key, value, k_cache, v_cache, bt, qsl, lens, mql, D ** -0.5, out,
                                         tiles=tiles, variant=variant)
            try:
                out.fill_(float("nan"))
                call()
                err = rel_err(out.view(B, chunk, H, D).transpose(1, 2), ref)
                assert err < 2e-2, f"rel err {err:.2e}"
                t = graph_ms(call)
                row.update(ms=t, TFLOPs=flops / t / 1e9, rel_err=err)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            print("engine kernel", row, flush=True)
    return rows


def mixed_graph_rows() -> list[dict]:
    """The prefill launch of a mixed step's CUDA graph (step_profile's mixed window): one 512-token
    prompt, 200 decode rows at context 512 (left to the decode launch) and 56 empty buffer rows, 768
    padded tokens. The block-table kernel (before) and prefill_attention's two grids, same inputs."""
    from kernels.paged_attention import paged_attention

    bs, n_dec, n_empty, T = 16, 200, 56, 768
    q_lens = [512] + [1] * n_dec + [0] * n_empty
    seq_lens = [512] + [513] * n_dec + [0] * n_empty
    S = len(q_lens)
    nb = -(-513 // bs)
    k_cache = torch.randn(S * nb, bs, HKV, D, device="cuda", dtype=DT)
    v_cache = torch.randn_like(k_cache)
    bt = torch.randperm(S * nb, device="cuda").view(S, nb).int()
    qkv = torch.randn(T, (H + 2 * HKV) * D, device="cuda", dtype=DT)
    q = qkv[:, : H * D].view(T, H, D)
    key = qkv[:, H * D: (H + HKV) * D].view(T, HKV, D)
    value = qkv[:, (H + HKV) * D:].view(T, HKV, D)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), device="cuda", dtype=torch.int32)
    lens = torch.tensor(seq_lens, device="cuda", dtype=torch.int32)
    singles = torch.arange(1, 1 + n_dec, device="cuda", dtype=torch.int32)
    # the prompt's own K/V in the cache, as write_kv_cache leaves them
    pos = torch.arange(512, device="cuda")
    k_cache[bt[0, pos // bs].long(), pos % bs] = key[:512]
    v_cache[bt[0, pos // bs].long(), pos % bs] = value[:512]
    out = torch.empty(T, H, D, device="cuda", dtype=DT)
    ref = paged_attention(q, k_cache, v_cache, bt, qsl, lens, 512, 513, D ** -0.5, decode_seq_index=singles)[:512]
    rows = []

    def both_launches(fresh):  # prefill + decode launches, as the engine's mixed graph runs them
        return lambda: paged_attention(q, k_cache, v_cache, bt, qsl, lens, 512, 513, D ** -0.5, out=out,
                                       decode_seq_index=singles, **fresh)

    def prefill_only(variant):
        return lambda: prefill_attention(q, key, value, k_cache, v_cache, bt, qsl, lens, 512, D ** -0.5, out,
                                         skip_single=True, variant=variant)

    cases = {"block_table+decode": both_launches({}),
             "prefill only, contiguous kernel": prefill_only({})}
    for name, call in cases.items():
        out.fill_(float("nan"))
        call()
        err = rel_err(out[:512], ref)
        assert err < 2e-2, f"{name}: rel err {err:.2e}"
        row = {"case": name, "ms": graph_ms(call), "rel_err": err}
        rows.append(row)
        print("mixed graph", row, flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="1x2048,1x8192,1x16384,8x2048")
    ap.add_argument("--out", default=None)
    ap.add_argument("--engine-shapes", default="1x2048x0,1x8192x0,8x2048x0,8x2048x1024,1x8192x4096",
                    help="BxCTXxPREFIX for kernels/prefill_attention.py's variants ('' to skip)")
    ap.add_argument("--skip-forms", action="store_true", help="only the engine kernel's variants")
    ap.add_argument("--engine-variants", default=None, type=json.loads,
                    help='a JSON list of kernel switch dicts, e.g. \'[{}, {"PREFIX": false}]\' (default: those two)')
    ap.add_argument("--engine-tiles", default=None,
                    help="BLOCK_M/BLOCK_N/warps/stages,... for the engine kernel (default: its two classes)")
    a = ap.parse_args()

    def alloc(size, align, stream):  # scratch for on-device descriptors, should Triton want any
        return torch.empty(size, dtype=torch.int8, device="cuda")

    triton.set_allocator(alloc)
    rows = []
    for s in ([] if a.skip_forms else a.shapes.split(",")):
        B, ctx = (int(x) for x in s.split("x"))
        rows.append(run_shape(B, ctx))
    engine = []
    for s in filter(None, a.engine_shapes.split(",")):
        B, ctx, prefix = (int(x) for x in s.split("x"))
        tiles = ENGINE_TILES if not a.engine_tiles else [tuple(int(x) for x in t.split("/"))
                                                         for t in a.engine_tiles.split(",")]
        engine.extend(engine_kernel_rows(B, ctx, prefix, tiles, a.engine_variants or ENGINE_VARIANTS))
    mixed = mixed_graph_rows()
    save_report("prefill-probe", {"triton": triton.__version__, "heads": {"q": H, "kv": HKV, "d": D},
                                  "rows": rows, "engine_kernel": engine, "mixed_graph_prefill": mixed}, "cuda", a.out)
    for r in engine:
        v = ",".join(f"{k}={int(x)}" for k, x in r["variant"].items()) or "default"
        r = {**r, "variant": v}
        print(f"engine B={r['B']} ctx={r['ctx']} prefix={r['prefix']} {r['tiles']} {v}: "
              + (f"{r['TFLOPs']:.0f} TFLOP/s" if "ms" in r else r["error"][:100]))
    print(f"{'B':>3} {'ctx':>6} {'sdpa TF':>8} {'paged x':>8} {'best form':>28} {'TF':>6} {'x sdpa':>6}")
    for r in rows:
        ok = [f for f in r["forms"] if "ms" in f]
        best = max(ok, key=lambda f: f["TFLOPs"]) if ok else None
        name = f"{best['form']} {best['BLOCK_M']}x{best['BLOCK_N']} {best['warps']}w{best['stages']}s" if best else "-"
        print(f"{r['B']:>3} {r['ctx']:>6} {r['sdpa_TFLOPs']:>8.0f} {r['paged_vs_sdpa']:>8.2f} {name:>28} "
              f"{best['TFLOPs'] if best else 0:>6.0f} {best['vs_sdpa'] if best else 0:>6.2f}")


if __name__ == "__main__":
    main()
