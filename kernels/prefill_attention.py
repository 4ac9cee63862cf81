"""Prefill attention that reads the chunk's own K/V contiguously, through TMA descriptors (sm_90).

paged_attention's prefill programs gather every K/V tile through the block table with pointer loads;
on the H200 they reach 0.60-0.70x SDPA. The same FlashAttention-2 loop over contiguous K/V with host
tensor descriptors (TMA loads), one query head per program, reaches 0.91-0.99x SDPA at B=1 ctx 2k-16k
and B=8 ctx 2k (bench/prefill_probe.py, bench/results/prefill-probe-h200-2026-12-01-1a42c92.json).
A prefill chunk's new tokens are contiguous already (rows of the q|k|v projection), so only its
cached prefix, written by earlier steps, needs the block table:

    keys of sequence s:  [ cached prefix: paged, pointer loads | this chunk: contiguous, TMA ]
    query rows:                                                 [ this chunk            ]

Program (q-block, query head): BLOCK_M rows of one head. It walks the prefix in BLOCK_N tiles (the
last one masked), then the chunk's keys below its own rows unmasked, then its diagonal block masked.
The caller has written the chunk's K/V to the cache already (later steps read them there).

Used by ``paged_attention`` when it is given the fresh ``key`` / ``value`` and the batch suits it:
KV cache in the query's dtype (no FP8), no sliding window, head dim 64 or 128, and a GPU with TMA
(compute capability >= 9) or the interpreter. Everything else keeps the block-table kernel.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


# (BLOCK_M, BLOCK_N, num_warps, num_stages) by the longest query chunk of the launch, from the probe:
# chunks of <= 2048 tokens (the mix, the mixed-step graphs): 64x64 / 4 warps (0.91-0.93x SDPA against
# 0.87-0.88x for 128x128); longer chunks 128x128 / 8 warps (0.95-0.99x against 0.77-0.85x).
SHORT_CHUNK_TOKENS = 2048
SHORT_CHUNK_TILES = (64, 64, 4, 3)
LONG_CHUNK_TILES = (128, 128, 8, 3)
# With 128x128 tiles a static diagonal loop and TMA stores of whole output blocks gave +10% at an
# 8k prompt (465 -> 514 TFLOP/s) and were neutral with a cached prefix; with 64x64 tiles neutral
# (bench/results/prefill-probe-h200-2026-12-01-cf61666-variants.json).
# HEADS_INNER: the grid's fast axis walks the query heads of one q-block instead of the q-blocks of
# one head, so the heaviest q-blocks of every head start first (longest first over the whole grid,
# not per head) and a KV head's QPK query heads read its tiles together. Short chunks: one 2k prompt
# 358 -> 414 TFLOP/s (+16%: its 1056 programs are few waves, where the tail counts), B=8 ctx 512 / 2k
# +1% / +1.4%, B=64 ctx 512 -0.4% (prefill-probe-h200-2026-12-02-32e5b01-variants.json). Long chunks
# (128x128): one 4k / 8k prompt +8% / +2.5%, B=8 ctx 4k +2% (prefill-probe-*-548de64-long.json).
SHORT_CHUNK_VARIANT = {"PREFIX": True, "STATIC_DIAG": False, "TMA_STORE": False, "HEADS_INNER": True}
LONG_CHUNK_VARIANT = {"PREFIX": True, "STATIC_DIAG": True, "TMA_STORE": True, "HEADS_INNER": True}
# The engine takes this path only for batches whose longest chunk exceeds SHORT_CHUNK_TOKENS. Below
# that the kernel alone is faster too (0.82x SDPA against 0.62x at B=8 ctx 2k), but in the engine's
# batches it is not: one program per query head (32) instead of per KV head (8), and each decode row
# of a mixed step and each empty row of a graph owns a slot per head that exits after its lookup; at
# two resident programs an SM the ShareGPT mix's mixed steps took 10.1 s instead of 9.4 s
# (step-profile-*-3fbe82e vs -1a42c92), and a persistent grid over only the real q-blocks, tried
# next, 11.1 s (its per-item lookup; ddf20df). Long chunks have few such slots: an 8k prompt's
# prefill attention runs at 0.94x SDPA against 0.69x (kernels-h200-2026-12-01-ddf20df-prefill.json).
ENGINE_MIN_CHUNK_TOKENS = SHORT_CHUNK_TOKENS + 1
# Also taken by launches of over 1024 tokens where every sequence has a chunk (no decode rows): the
# engine runs those eagerly, not as a mixed-step graph (TritonAttentionBackend.runs_eagerly),
# so their grid holds no empty rows, and they have no one-token rows, whose 32 head slots would each
# read the row's whole context. There the kernel's own speed counts: 0.70 / 0.69 / 0.83x SDPA against
# 0.48 / 0.47 / 0.62x for the block-table kernel at B=8 ctx 512, B=64 ctx 512, B=8 ctx 2k, and 0.87
# against 0.63x for one 2k prompt in round 3 (kernels-h200-2026-12-02-01c403c.json, -3fbe82e.json).
# Why not shorter: eagerly, a step's ~200 Triton launches cost ~8 ms of host time (~40 us each), under
# the ~24 ms a 1k-token step of an 8B model takes on the GPU; a 256-token step would wait on them.
EAGER_MIN_TOKENS = SHORT_CHUNK_TOKENS // 2 + 1
INTERPRET_TILES = (32, 16, 4, 1)  # small, and BLOCK_N < BLOCK_M: CPU tests walk sub-tiles of the diagonal
HEAD_DIMS = (64, 128)
LOG2E = 1.4426950408889634


@triton.jit
def _locate(query_start_loc_ptr, seq_lens_ptr, q_block_id, num_seqs, BLOCK_M: tl.constexpr):
    """(sequence, its first query row, query length, cached prefix length) of global q-block q_block_id:
    the last s with ``query_start_loc[s] // BLOCK_M + s <= q_block_id``.

    The three per-sequence vectors are loaded together, 256 sequences a pass, and the scalars picked
    from registers: one memory latency before the program's first tile instead of four dependent ones
    (a search, then query_start_loc[s], [s + 1] and seq_lens[s]): +8% at B=8 2k-token chunks.
    """
    seq = tl.full((), -1, tl.int32)
    q_start = tl.full((), 0, tl.int32)
    q_end = tl.full((), 0, tl.int32)
    seq_len = tl.full((), 0, tl.int32)
    for c in range(0, num_seqs, 256):
        idx = c + tl.arange(0, 256)
        ok = idx < num_seqs
        starts = tl.load(query_start_loc_ptr + idx, mask=ok, other=0)
        ends = tl.load(query_start_loc_ptr + idx + 1, mask=ok, other=0)
        lens = tl.load(seq_lens_ptr + idx, mask=ok, other=0)
        last = tl.max(tl.where(ok & (starts // BLOCK_M + idx <= q_block_id), idx, -1), 0)
        pick = idx == last  # nowhere when no sequence of this pass starts at or before the block
        found = last >= 0
        seq = tl.where(found, last, seq)
        q_start = tl.where(found, tl.sum(tl.where(pick, starts, 0), 0), q_start)
        q_end = tl.where(found, tl.sum(tl.where(pick, ends, 0), 0), q_end)
        seq_len = tl.where(found, tl.sum(tl.where(pick, lens, 0), 0), seq_len)
    q_len = q_end - q_start
    return seq, q_start, q_len, seq_len - q_len


@triton.jit
def _online_softmax_step(acc, m_i, l_i, q, k_t, v, scale_log2, mask, MASKED: tl.constexpr,
                         IEEE_DOT: tl.constexpr):
    """acc/m_i/l_i over one more key tile; m_i in log2 units. MASKED: ``mask`` [BLOCK_M, BLOCK_N]
    says which scores count (every row has seen a key before an all-masked row of a tile)."""
    if IEEE_DOT:
        s = tl.dot(q, k_t, input_precision="ieee")
    else:
        s = tl.dot(q, k_t)
    if MASKED:
        s = tl.where(mask, s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
    else:  # the scale folded into one multiply-add per score
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
        p = tl.math.exp2(s * scale_log2 - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE_DOT:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def _cached_tile(k_head, v_head, bt_row, pos, stride_kb, stride_kt, stride_vb, stride_vt, d,
                 BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr, ctx_len):
    """K^T [HEAD_DIM, BLOCK_N] and V [BLOCK_N, HEAD_DIM] of prefix positions ``pos`` from the paged cache
    (MASKED: positions >= ctx_len read as 0; the cache may hold NaN there)."""
    if MASKED:
        ok = pos < ctx_len
        blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=ok, other=0).to(tl.int64)
        k = tl.load(k_head + (blk * stride_kb + (pos % BLOCK_SIZE) * stride_kt)[:, None] + d[None, :],
                    mask=ok[:, None], other=0.0)
        v = tl.load(v_head + (blk * stride_vb + (pos % BLOCK_SIZE) * stride_vt)[:, None] + d[None, :],
                    mask=ok[:, None], other=0.0)
    else:
        blk = tl.load(bt_row + pos // BLOCK_SIZE).to(tl.int64)
        k = tl.load(k_head + (blk * stride_kb + (pos % BLOCK_SIZE) * stride_kt)[:, None] + d[None, :])
        v = tl.load(v_head + (blk * stride_vb + (pos % BLOCK_SIZE) * stride_vt)[:, None] + d[None, :])
    return tl.trans(k), v


@triton.jit
def _attend_block(q_desc, k_desc, v_desc, o_desc, out_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr,
                  s, q_start, q_len, ctx_len, m0, h, scale_log2,
                  stride_ot, stride_oh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bt,
                  QPK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, IEEE_DOT: tl.constexpr, PREFIX: tl.constexpr, STATIC_DIAG: tl.constexpr,
                  TMA_STORE: tl.constexpr):
    """Rows [m0, m0 + BLOCK_M) of query head h of sequence s: cached prefix, then the chunk's own keys."""
    kvh = h // QPK
    rows = m0 + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    # rows past the chunk's end (the next sequence's tokens) are computed and never stored
    q = q_desc.load([q_start + m0, h * HEAD_DIM])
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)

    # 1) the cached prefix [0, ctx_len), visible to every row: full tiles, then the tail masked
    if PREFIX:
        bt_row = block_tables_ptr + s.to(tl.int64) * stride_bt
        k_head = k_cache_ptr + kvh * stride_kh
        v_head = v_cache_ptr + kvh * stride_vh
        full = ctx_len // BLOCK_N * BLOCK_N
        for start in range(0, full, BLOCK_N):
            k_t, v = _cached_tile(k_head, v_head, bt_row, start + offs_n, stride_kb, stride_kt, stride_vb,
                                  stride_vt, d, BLOCK_SIZE, False, ctx_len)
            acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k_t, v, scale_log2, None, False, IEEE_DOT)
        if full < ctx_len:
            pos = full + offs_n
            k_t, v = _cached_tile(k_head, v_head, bt_row, pos, stride_kb, stride_kt, stride_vb, stride_vt,
                                  d, BLOCK_SIZE, True, ctx_len)
            visible = (pos < ctx_len)[None, :] & (rows >= 0)[:, None]
            acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k_t, v, scale_log2, visible, True, IEEE_DOT)

    # 2) this chunk's keys: below the block's rows unmasked, then the diagonal block causal
    for start in range(0, m0, BLOCK_N):
        k_t = k_desc.load([q_start + start, kvh * HEAD_DIM]).T
        v = v_desc.load([q_start + start, kvh * HEAD_DIM])
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k_t, v, scale_log2, None, False, IEEE_DOT)
    if STATIC_DIAG:  # keys past the chunk are masked for every stored row (and zero past the tensor)
        diag_end = m0 + BLOCK_M
    else:
        diag_end = tl.minimum(m0 + BLOCK_M, q_len)
    for start in range(m0, diag_end, BLOCK_N):
        k_t = k_desc.load([q_start + start, kvh * HEAD_DIM]).T
        v = v_desc.load([q_start + start, kvh * HEAD_DIM])
        causal = (start + offs_n)[None, :] <= rows[:, None]
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k_t, v, scale_log2, causal, True, IEEE_DOT)

    o = (acc / l_i[:, None]).to(out_ptr.dtype.element_ty)
    if TMA_STORE and m0 + BLOCK_M <= q_len:  # a whole block of this chunk's rows
        o_desc.store([q_start + m0, h * HEAD_DIM], o)
    else:
        out_rows = (q_start + rows).to(tl.int64)
        tl.store(out_ptr + out_rows[:, None] * stride_ot + h * stride_oh + d[None, :], o,
                 mask=(rows < q_len)[:, None])


# num_seqs and grid0 change every step: not specialised (each new value class would compile a variant)
@triton.jit(do_not_specialize=["num_seqs", "grid0"])
def _prefill_attention_kernel(
        q_desc, k_desc, v_desc, o_desc, out_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, query_start_loc_ptr,
        seq_lens_ptr, num_seqs, grid0, scale_log2,
        stride_ot, stride_oh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bt,
        NUM_HEADS: tl.constexpr, QPK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SKIP_SINGLE: tl.constexpr, IEEE_DOT: tl.constexpr,
        PREFIX: tl.constexpr, STATIC_DIAG: tl.constexpr, TMA_STORE: tl.constexpr, HEADS_INNER: tl.constexpr):
    """One program per (q-block slot, head); the grid is an upper bound, programs without rows exit."""
    # the last q-blocks (most keys) first, so the longest programs do not start in the last wave
    if HEADS_INNER:
        q_block_id = grid0 - 1 - tl.program_id(1)
        h = tl.program_id(0)
    else:
        q_block_id = grid0 - 1 - tl.program_id(0)
        h = tl.program_id(1)
    s, q_start, q_len, ctx_len = _locate(query_start_loc_ptr, seq_lens_ptr, q_block_id, num_seqs, BLOCK_M)
    m0 = (q_block_id - (q_start // BLOCK_M + s)) * BLOCK_M  # first row of this block, within the chunk
    if m0 >= q_len:
        return
    if SKIP_SINGLE:  # the decode rows of a mixed batch, done by paged_attention's decode launch
        if q_len == 1:
            return
    _attend_block(q_desc, k_desc, v_desc, o_desc, out_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr,
                  s, q_start, q_len, ctx_len, m0, h, scale_log2,
                  stride_ot, stride_oh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bt,
                  QPK, HEAD_DIM, BLOCK_SIZE, BLOCK_M, BLOCK_N, IEEE_DOT, PREFIX, STATIC_DIAG, TMA_STORE)


def _rows_descriptor(x: torch.Tensor, block_rows: int):
    """A 2-D TMA descriptor over [tokens, heads * head_dim] of a [tokens, heads, head_dim] view whose
    heads are adjacent in memory (a slice of the q|k|v projection's rows), one head's tile per box."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    tokens, heads, head_dim = x.shape
    return TensorDescriptor(x, [tokens, heads * head_dim], [x.stride(0), 1], [block_rows, head_dim])


@functools.lru_cache(maxsize=None)
def _has_tma(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def suits(query, key, value, out, k_cache, sliding_window, max_query_len, min_query_len=1) -> bool:
    """Whether ``prefill_attention`` takes this batch (else paged_attention's own prefill programs):
    on the GPU, a chunk of over 2048 tokens, or over 1024 tokens with no one-token sequence
    (min_query_len > 1). Under the interpreter every prefill batch does, so that the CPU tests
    exercise it."""
    dev = query.device
    if dev.type == "cuda":
        if not _has_tma(dev) or not gpu_takes(query.shape[0], max_query_len, min_query_len):
            return False
    elif not _interpreting():
        return False
    head_dim = query.shape[2]
    if k_cache.dtype != query.dtype or sliding_window is not None or head_dim not in HEAD_DIMS:
        return False
    item = query.element_size()
    for x in (query, key, value, out):  # TMA: 16-byte aligned base and row stride, heads adjacent
        if x.stride(2) != 1 or x.stride(1) != head_dim or x.data_ptr() % 16 or (x.stride(0) * item) % 16:
            return False
    return True


def gpu_takes(num_tokens: int, max_query_len: int, min_query_len: int) -> bool:
    """suits' rule on the GPU by the launch's shape: a long chunk, or an eager batch of chunks only."""
    return max_query_len >= ENGINE_MIN_CHUNK_TOKENS or (num_tokens >= EAGER_MIN_TOKENS and min_query_len > 1)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def prefill_attention(query, key, value, k_cache, v_cache, block_tables, query_start_loc, seq_lens,
                      max_query_len: int, scale: float, out: torch.Tensor, *, skip_single: bool = False,
                      tiles: tuple[int, int, int, int] | None = None, variant: dict | None = None,
                      has_prefix: bool = True) -> torch.Tensor:
    """Causal attention of packed query chunks over [cached prefix | the chunk's own key/value].

    Arguments as ``paged_attention`` (the caller has checked them and ``suits``), plus ``key`` /
    ``value`` ``[num_tokens, num_kv_heads, head_dim]``: this step's K/V of the query tokens, already
    written to the cache. skip_single: leave one-token sequences to the caller's decode launch.
    tiles: (BLOCK_M, BLOCK_N, num_warps, num_stages) for tuning (bench/); None = by chunk length.
    variant: kernel switches for tuning (bench/prefill_probe.py): PREFIX (compile the cached-prefix
    loop), STATIC_DIAG, TMA_STORE, HEADS_INNER.
    has_prefix: False when no sequence has a cached prefix (the caller knows: seq_len == query length
    for every one): the prefix loop is compiled out, +4-8% at every shape of one H200 run with fresh
    prompts, B=1-64, ctx 512-4k (prefill-probe-h200-2026-12-02-835a405-short.log), where the loop
    that runs no iteration still costs its registers and branches.
    """
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    num_seqs = block_tables.shape[0]
    long_chunks = max_query_len > SHORT_CHUNK_TOKENS
    if tiles is None:
        if _interpreting():
            tiles = INTERPRET_TILES
        else:
            tiles = LONG_CHUNK_TILES if long_chunks else SHORT_CHUNK_TILES
    block_m, block_n, num_warps, num_stages = tiles
    if block_m % block_n:  # the unmasked loop below a q-block's rows ends at its first row, m0
        raise ValueError(f"prefill tiles {tiles}: BLOCK_N must divide BLOCK_M")
    switches = dict(LONG_CHUNK_VARIANT if long_chunks else SHORT_CHUNK_VARIANT)
    if not has_prefix:
        switches["PREFIX"] = False
    switches.update(variant or {})
    grid0 = num_tokens // block_m + num_seqs  # an upper bound on the q-blocks; the rest exit at once
    grid = (num_heads, grid0) if switches["HEADS_INNER"] else (grid0, num_heads)
    _prefill_attention_kernel[grid](
        _rows_descriptor(query, block_m), _rows_descriptor(key, block_n), _rows_descriptor(value, block_n),
        _rows_descriptor(out, block_m), out, k_cache, v_cache, block_tables, query_start_loc, seq_lens, num_seqs,
        grid0, scale * LOG2E,
        out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        NUM_HEADS=num_heads, QPK=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_N=block_n, SKIP_SINGLE=skip_single, IEEE_DOT=query.dtype == torch.float32,
        **switches, num_warps=num_warps, num_stages=num_stages,
    )
    return out
