"""Paged attention for a batch that mixes prefill chunks and decode tokens (causal, GQA, sliding window).

Inputs follow engine_svc/attention/base.py: queries packed along dim 0, a paged KV cache
``[num_blocks, block_size, num_kv_heads, head_dim]`` that already holds every position a query attends
to, and one block table per sequence::

    seq:          0            1     2
    query tokens: [q q q q]    [q]   [q q]      query_start_loc = [0, 4, 5, 7]
    context:      |---c0---|q| |-c1-|q|  ...    seq_lens = context + new query tokens

Query token j of sequence s sits at position ``seq_lens[s] - query_len[s] + j``.

One program computes a tile of BLOCK_M rows = BLOCK_Q query tokens x the QPK query heads that share
one KV head (GQA packing: each K/V tile is read once for all of them). It walks the sequence's KV in
TILE_N-token tiles, gathering each token's block through the block table, with an online softmax.

Two paths, chosen by ``paged_attention`` (see ``_plan``):
  * one pass: grid (q_blocks, kv_heads); each program writes its final output.
  * split-KV (flash-decoding): grid (q_blocks, kv_heads, num_splits); each program covers one
    segment of the KV positions and writes an unnormalised partial (acc, max, sum); a second kernel
    merges the splits. Used when the one-pass grid has too few programs to fill the GPU (few
    sequences, long contexts).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from kernels._checks import FLOAT_DTYPES, check_shape, check_tensor, next_pow2

LOG2E = 1.4426950408889634
MAX_SPLITS = 64  # partial buffers and the merge tile scale with this


@triton.jit
def _find_seq(query_start_loc_ptr, q_block_id, num_seqs, BLOCK_Q: tl.constexpr):
    """Largest s with ``query_start_loc[s] // BLOCK_Q + s <= q_block_id`` (binary search)."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_block = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_block <= q_block_id:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_tile(acc, m_i, l_i, q, q_pos, start, kv_end, bt_row, k_head, v_head,
                 stride_kb, stride_kt, stride_vb, stride_vt, scale_log2, sliding_window,
                 d, d_ok, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, MASKED: tl.constexpr,
                 USE_WINDOW: tl.constexpr, IEEE_DOT: tl.constexpr):
    """One online-softmax step over KV positions [start, start + TILE_N).

    acc [BLOCK_M, HEAD_DIM_PAD], m_i / l_i [BLOCK_M] (max in log2 units, sum), q [BLOCK_M, HEAD_DIM_PAD],
    q_pos [BLOCK_M]. MASKED=False promises every position is < kv_end and visible to every row.
    """
    pos = start + tl.arange(0, TILE_N)
    if MASKED:
        pos_ok = pos < kv_end
        blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=pos_ok, other=0).to(tl.int64)
        kv_ok = pos_ok[:, None] & d_ok[None, :]
    else:
        blk = tl.load(bt_row + pos // BLOCK_SIZE).to(tl.int64)
        kv_ok = d_ok[None, :]
    row = blk * stride_kb + (pos % BLOCK_SIZE) * stride_kt  # [TILE_N] token offsets (same for V strides)
    # K^T tile [HEAD_DIM_PAD, TILE_N]; masked positions read as 0 (the cache may hold NaN there)
    k = tl.load(k_head + row[None, :] + d[:, None], mask=tl.trans(kv_ok), other=0.0)
    if IEEE_DOT:
        s = tl.dot(q, k, input_precision="ieee")
    else:
        s = tl.dot(q, k)
    if MASKED:
        s = s * scale_log2
        # pos <= q_pos also keeps pos < kv_end for every valid row, so no separate bound is needed
        mask = pos[None, :] <= q_pos[:, None]
        if USE_WINDOW:
            mask = mask & (pos[None, :] > q_pos[:, None] - sliding_window)
        s = tl.where(mask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row with nothing visible yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_sub[:, None])
    else:
        # every row sees every position: the max is finite, and scaling folds into one FMA
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
        m_sub = m_new
        p = tl.math.exp2(s * scale_log2 - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    v_row = blk * stride_vb + (pos % BLOCK_SIZE) * stride_vt
    v = tl.load(v_head + v_row[:, None] + d[None, :], mask=kv_ok, other=0.0)
    acc = acc * alpha[:, None]
    if IEEE_DOT:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, l_i


@triton.jit
def _paged_attention_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]; written when not SPLIT
    part_acc_ptr,  # [num_tokens, num_heads, num_splits, HEAD_DIM_PAD] fp32; written when SPLIT
    part_ml_ptr,  # [num_tokens, num_heads, num_splits, 2] fp32 (running max in log2 units, sum); SPLIT
    query_ptr,  # [num_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks] int32
    query_start_loc_ptr,  # [num_seqs + 1] int32
    seq_lens_ptr,  # [num_seqs] int32
    scale_log2,  # softmax scale * log2(e): scores are kept in log2 units so exp2 is used
    num_seqs,
    sliding_window,  # keys with position > query position - sliding_window; read only if USE_WINDOW
    seg_len,  # KV positions per split, a multiple of TILE_N; read only if SPLIT
    num_splits,  # read only if SPLIT
    stride_qt, stride_qh,
    stride_ot, stride_oh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    QPK: tl.constexpr,  # query heads per KV head (GQA ratio)
    HEAD_DIM: tl.constexpr,  # true head size
    HEAD_DIM_PAD: tl.constexpr,  # power of 2 >= HEAD_DIM; padded columns are masked to 0
    BLOCK_SIZE: tl.constexpr,  # cache block size (tokens)
    BLOCK_M: tl.constexpr,  # tile rows, power of 2 >= 16, >= QPK
    BLOCK_Q: tl.constexpr,  # query tokens per tile = BLOCK_M // QPK
    TILE_N: tl.constexpr,  # KV tokens per inner-loop step
    USE_WINDOW: tl.constexpr,  # sliding window on
    SPLIT: tl.constexpr,  # split-KV path: write partials instead of the output
    IEEE_DOT: tl.constexpr,  # fp32 inputs: full-precision dots instead of tf32
):
    # Last q-blocks first: under a causal mask they read the most KV, so starting them early shortens
    # the tail of the launch (programs of the same KV head stay adjacent and share K/V in L2).
    q_block_id = tl.num_programs(0) - 1 - tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    seq = _find_seq(query_start_loc_ptr, q_block_id, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    local_block = q_block_id - (q_start // BLOCK_Q + seq)
    if local_block * BLOCK_Q >= q_len:
        return  # past this sequence's last q-block (the grid is an upper bound)
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    q_local = local_block * BLOCK_Q + rows // QPK  # query token index within the sequence
    head = kvh * QPK + rows % QPK
    row_ok = (rows < BLOCK_Q * QPK) & (q_local < q_len)
    q_pos = ctx_len + q_local  # [BLOCK_M] position of each row's token
    tok = (q_start + q_local).to(tl.int64)
    d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = d < HEAD_DIM
    q = tl.load(query_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # KV positions this program reads: up to the block's last query position (causal) ...
    first_q_pos = ctx_len + local_block * BLOCK_Q
    kv_end = tl.minimum(first_q_pos + BLOCK_Q, seq_len)
    kv_start = 0
    if USE_WINDOW:  # ... and from the first query's window start, rounded down to a tile
        kv_start = tl.maximum(first_q_pos - sliding_window + 1, 0)
        kv_start = (kv_start // TILE_N) * TILE_N
    if SPLIT:  # ... within this split's segment (seg_len is a multiple of TILE_N: tiles stay aligned)
        kv_start = tl.maximum(kv_start, split * seg_len)
        kv_end = tl.minimum(kv_end, (split + 1) * seg_len)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_head = k_cache_ptr + kvh * stride_kh
    v_head = v_cache_ptr + kvh * stride_vh
    # Two phases: tiles every row sees whole (all positions <= the block's first query position, so
    # no causal mask and no bounds), then the tiles along the diagonal and the sequence end, masked.
    # With a window the lower edge needs masks too, so everything goes through the masked phase.
    if USE_WINDOW:
        diag_start = kv_start
    else:
        diag_start = tl.minimum(tl.maximum((first_q_pos + 1) // TILE_N * TILE_N, kv_start), kv_end)
    for start in range(kv_start, diag_start, TILE_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, q_pos, start, kv_end, bt_row, k_head, v_head,
                                     stride_kb, stride_kt, stride_vb, stride_vt, scale_log2, sliding_window,
                                     d, d_ok, BLOCK_SIZE, TILE_N, False, False, IEEE_DOT)
    for start in range(diag_start, kv_end, TILE_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, q_pos, start, kv_end, bt_row, k_head, v_head,
                                     stride_kb, stride_kt, stride_vb, stride_vt, scale_log2, sliding_window,
                                     d, d_ok, BLOCK_SIZE, TILE_N, True, USE_WINDOW, IEEE_DOT)

    row_head = tok * (QPK * tl.num_programs(1)) + head  # flat (token, head) index
    if SPLIT:
        part = row_head * num_splits + split
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM_PAD + d[None, :], acc, mask=row_ok[:, None])
        tl.store(part_ml_ptr + part * 2, m_i, mask=row_ok)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_ok)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _merge_splits_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    part_acc_ptr,  # [num_tokens, num_heads, num_splits, HEAD_DIM_PAD] fp32
    part_ml_ptr,  # [num_tokens, num_heads, num_splits, 2] fp32
    query_start_loc_ptr,  # [num_seqs + 1] int32: tokens past query_start_loc[num_seqs] are skipped
    num_seqs,
    num_splits,
    stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    SPLITS_PAD: tl.constexpr,  # power of 2 >= num_splits
):
    tok = tl.program_id(0)
    head = tl.program_id(1)
    if tok >= tl.load(query_start_loc_ptr + num_seqs):
        return
    sp = tl.arange(0, SPLITS_PAD)
    sp_ok = sp < num_splits
    base = (tok.to(tl.int64) * tl.num_programs(1) + head) * num_splits
    m = tl.load(part_ml_ptr + (base + sp) * 2, mask=sp_ok, other=float("-inf"))
    l = tl.load(part_ml_ptr + (base + sp) * 2 + 1, mask=sp_ok, other=0.0)
    m_max = tl.max(m, 0)  # finite: every token sees at least its own position in some split
    w = tl.math.exp2(m - m_max)  # empty splits have m = -inf -> weight 0
    d = tl.arange(0, HEAD_DIM_PAD)
    acc = tl.load(part_acc_ptr + (base + sp)[:, None] * HEAD_DIM_PAD + d[None, :], mask=sp_ok[:, None],
                  other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(out_ptr + tok.to(tl.int64) * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _plan(head_dim_pad, qpk, num_tokens, num_seqs, num_kv_heads, max_query_len, max_seq_len, num_splits,
          num_sms, interpret):
    """Tile sizes, launch options and the number of KV splits.

    Tiles: decode-like batches (max_query_len * QPK <= 64) use BLOCK_M = 16 rows (the smallest tile
    tl.dot takes), so a decode token's QPK heads fill the rows and little compute is wasted, and long
    KV tiles with deep pipelining (memory-bound); longer queries use BLOCK_M = 64 rows, TILE_N = 64
    (compute-bound; the best of the H100 sweep). The interpreter gets small tiles so CPU tests
    exercise many tiles per sequence.

    Split-KV heuristic (when num_splits is None), from the H100 sweeps in bench/KERNELS_NOTES.md:
    split only decode-like batches (max_query_len <= 16) whose one-pass grid, num_q_blocks *
    num_kv_heads, is under 2 programs per SM (at 4 programs per SM and more, one pass was fastest:
    the partials and the merge launch cost more than the tail they remove). Splits = enough for
    ~4 programs per SM, at most MAX_SPLITS, and at least 256 KV positions per split, rounded down to a
    power of 2: at B=8, ctx=32k, 8 splits ran at 95% of copy bandwidth and 9 at 88%, and powers of 2
    were best in every split sweep (cause unconfirmed; see bench/KERNELS_NOTES.md). Because the split
    count depends on max_seq_len, a CUDA graph captured with max_seq_len = the model's limit serves
    every shorter batch (empty splits merge to nothing).
    """
    if max_query_len * qpk <= 64:
        block_m = max(16, next_pow2(qpk))
        tile_n = 32 if interpret else (128 if head_dim_pad <= 128 else 64)
        num_warps, num_stages = 4, (4 if head_dim_pad <= 128 else 2)
    else:
        block_m = 32 if interpret else 64
        block_m = max(block_m, next_pow2(qpk))
        tile_n = 32 if interpret else 64
        num_warps, num_stages = 4, (3 if head_dim_pad <= 128 else 2)
    block_q = block_m // qpk
    grid0 = num_tokens // block_q + num_seqs
    if num_splits is None:
        num_splits = 1
        # programs that do work: one q-block per decode sequence, about num_tokens / BLOCK_Q otherwise
        programs = max(num_seqs, math.ceil(num_tokens / block_q)) * num_kv_heads
        if not interpret and max_query_len <= 16 and programs < 2 * num_sms:
            num_splits = max(1, min(MAX_SPLITS, math.ceil(4 * num_sms / programs), max_seq_len // 256))
            num_splits = 1 << (num_splits.bit_length() - 1)  # round down to a power of 2 (see below)
    num_splits = max(1, min(int(num_splits), MAX_SPLITS, math.ceil(max_seq_len / tile_n)))
    seg_len = math.ceil(math.ceil(max_seq_len / num_splits) / tile_n) * tile_n
    return dict(block_m=block_m, block_q=block_q, tile_n=tile_n, num_warps=num_warps,
                num_stages=num_stages, grid0=grid0, num_splits=num_splits, seg_len=seg_len)


def _check_inputs(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, max_query_len,
                  max_seq_len, scale, sliding_window) -> None:
    """The launcher's argument checks (ValueError naming the argument); see paged_attention."""
    dev = query.device
    check_tensor("query", query, ndim=3, dtypes=FLOAT_DTYPES, device=dev)
    _, num_heads, head_dim = query.shape
    check_tensor("k_cache", k_cache, ndim=4, dtypes=(query.dtype,), device=dev)
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    check_tensor("v_cache", v_cache, ndim=4, dtypes=(query.dtype,), device=dev)
    check_shape("v_cache", v_cache, tuple(k_cache.shape))
    if cache_head_dim != head_dim:
        raise ValueError(f"k_cache: head_dim {cache_head_dim} != query head_dim {head_dim}")
    if head_dim > 256:
        raise ValueError(f"query: head_dim {head_dim} > 256 is not supported")
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"query: num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    check_tensor("block_tables", block_tables, ndim=2, dtypes=(torch.int32,), device=dev)
    num_seqs = block_tables.shape[0]
    check_tensor("query_start_loc", query_start_loc, ndim=1, dtypes=(torch.int32,), contiguous=True, device=dev)
    check_shape("query_start_loc", query_start_loc, (num_seqs + 1,))
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=(torch.int32,), contiguous=True, device=dev)
    check_shape("seq_lens", seq_lens, (num_seqs,))
    if max_query_len < 1 or max_seq_len < max_query_len:
        raise ValueError(f"max_query_len={max_query_len}, max_seq_len={max_seq_len}: need "
                         f"1 <= max_query_len <= max_seq_len")
    if block_tables.shape[1] * block_size < max_seq_len:
        raise ValueError(f"block_tables: {block_tables.shape[1]} blocks of {block_size} cannot hold "
                         f"max_seq_len={max_seq_len}")
    if not scale > 0:
        raise ValueError(f"scale={scale}: must be > 0")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window={sliding_window}: must be >= 1 or None")


def paged_attention(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, max_query_len: int,
                    max_seq_len: int, scale: float, sliding_window: int | None = None, out=None, *,
                    num_splits: int | None = None, plan_overrides: dict | None = None):
    """Causal attention of packed varlen queries over a paged KV cache.

    Args:
        query: ``[num_tokens, num_heads, head_dim]`` fp16/bf16/fp32 (fp32 runs ieee dots, for tests and
            fp32 models); token/head strides free, head_dim stride 1.
        k_cache, v_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``, query's dtype, head_dim
            stride 1; num_heads must be a multiple of num_kv_heads; head_dim <= 256.
        block_tables: int32 ``[num_seqs, max_blocks]``, column stride 1.
        query_start_loc: int32 ``[num_seqs + 1]`` contiguous, cumulative query lengths.
        seq_lens: int32 ``[num_seqs]`` contiguous, context + query tokens per sequence.
        max_query_len, max_seq_len: host ints, upper bounds over the batch (they pick tiles and splits).
        scale: softmax scale (usually head_dim ** -0.5).
        sliding_window: keys at positions > query position - sliding_window only; None = full.
        out: optional ``[num_tokens, num_heads, head_dim]`` output, query's dtype, head_dim stride 1.
        num_splits: force the number of KV splits (1 = one-pass); None = heuristic in ``_plan``.
        plan_overrides: for tuning (bench/kernels.py): replace entries of ``_plan``'s result
            (block_m, tile_n, num_warps, num_stages); block_q and the grid are re-derived.

    Returns:
        ``out`` (allocated when not given). Rows of tokens past ``query_start_loc[-1]`` are not written.

    Raises:
        ValueError: on a dtype, shape, stride, device or argument-range mismatch.

    Grid: axis 0 = ``num_tokens // BLOCK_Q + num_seqs``, an upper bound on the q-blocks of all
    sequences (sequence s owns ``ceil(query_len_s / BLOCK_Q)`` blocks starting at global id
    ``query_start_loc[s] // BLOCK_Q + s``; programs past a sequence's blocks exit at once);
    axis 1 = KV heads; axis 2 = KV splits.
    """
    _check_inputs(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, max_query_len, max_seq_len,
                  scale, sliding_window)
    dev = query.device
    num_tokens, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_seqs = block_tables.shape[0]
    if out is None:
        out = torch.empty_like(query, memory_format=torch.contiguous_format)
    else:
        check_tensor("out", out, ndim=3, dtypes=(query.dtype,), device=dev)
        check_shape("out", out, tuple(query.shape))
    if num_tokens == 0 or num_seqs == 0:
        return out

    qpk = num_heads // num_kv_heads
    head_dim_pad = max(16, next_pow2(head_dim))
    plan = _plan(head_dim_pad, qpk, num_tokens, num_seqs, num_kv_heads, max_query_len, max_seq_len, num_splits,
                 _num_sms(dev), interpret=dev.type != "cuda")
    if plan_overrides:
        plan.update(plan_overrides)
        plan["block_q"] = plan["block_m"] // qpk
        plan["grid0"] = num_tokens // plan["block_q"] + num_seqs
        plan["seg_len"] = math.ceil(math.ceil(max_seq_len / plan["num_splits"]) / plan["tile_n"]) * plan["tile_n"]
    split = plan["num_splits"] > 1
    if split:
        part_acc = torch.empty(num_tokens, num_heads, plan["num_splits"], head_dim_pad, dtype=torch.float32,
                               device=dev)
        part_ml = torch.empty(num_tokens, num_heads, plan["num_splits"], 2, dtype=torch.float32, device=dev)
    else:
        part_acc = part_ml = out  # unused by the kernel
    grid = (plan["grid0"], num_kv_heads, plan["num_splits"])
    _paged_attention_kernel[grid](
        out, part_acc, part_ml, query, k_cache, v_cache, block_tables, query_start_loc, seq_lens,
        scale * LOG2E, num_seqs, sliding_window or 0, plan["seg_len"], plan["num_splits"],
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        QPK=qpk, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_SIZE=block_size,
        BLOCK_M=plan["block_m"], BLOCK_Q=plan["block_q"], TILE_N=plan["tile_n"],
        USE_WINDOW=sliding_window is not None, SPLIT=split, IEEE_DOT=query.dtype == torch.float32,
        num_warps=plan["num_warps"], num_stages=plan["num_stages"],
    )
    if split:
        _merge_splits_kernel[(num_tokens, num_heads)](
            out, part_acc, part_ml, query_start_loc, num_seqs, plan["num_splits"], out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, SPLITS_PAD=next_pow2(plan["num_splits"]),
            num_warps=4,
        )
    return out


def paged_attention_reference(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens,
                              max_query_len: int, max_seq_len: int, scale: float,
                              sliding_window: int | None = None, out=None):
    """Plain-PyTorch ``paged_attention`` (same arguments): one vectorised softmax per sequence, in fp32.

    Reads ``query_start_loc`` and ``seq_lens`` on the host (a device sync), so it suits CPU runs and
    tests, not a CUDA hot path.
    """
    del max_query_len, max_seq_len  # derived exactly from the tensors here
    num_tokens, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    qpk = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(query, memory_format=torch.contiguous_format)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for s, seq_len in enumerate(lens):
        q_lo, q_hi = starts[s], starts[s + 1]
        q_len = q_hi - q_lo
        if q_len == 0:
            continue
        blocks = block_tables[s, : (seq_len + block_size - 1) // block_size].long()
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()  # [n, Hkv, D]
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        q = query[q_lo:q_hi].float().view(q_len, num_kv_heads, qpk, head_dim)  # [L, Hkv, G, D]
        scores = torch.einsum("lhgd,nhd->hgln", q, k) * scale  # [Hkv, G, L, n]
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)[:, None]
        k_pos = torch.arange(seq_len, device=query.device)[None, :]
        visible = k_pos <= q_pos
        if sliding_window is not None:
            visible &= k_pos > q_pos - sliding_window
        scores.masked_fill_(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        o = torch.einsum("hgln,nhd->lhgd", probs, v)  # [L, Hkv, G, D]
        out[q_lo:q_hi] = o.reshape(q_len, num_heads, head_dim).to(out.dtype)
    return out
