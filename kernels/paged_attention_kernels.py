"""The Triton programs behind kernels/paged_attention.py (launcher, tile plan and reference live there).

One program computes a tile of BLOCK_M rows = BLOCK_Q query tokens x the QPK query heads that share
one KV head (GQA packing: each K/V tile is read once for all of them). It walks the sequence's KV in
TILE_N-token tiles, gathering each token's block through the block table, with an online softmax in
log2 units (exp2, the softmax scale folded into one multiply).

FP8 caches (KV_FP8): K/V are stored as e4m3 values x_q = x / scale; tiles are converted to the query's
dtype in registers. The K scale is folded into the score scale and the V scale into the final
normalisation, so neither costs a multiply per element.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _find_seq(query_start_loc_ptr, q_block_id, num_seqs, BLOCK_Q: tl.constexpr):
    """Largest s with ``query_start_loc[s] // BLOCK_Q + s <= q_block_id``.

    Counted over chunks of 256 sequences (one load each, all lanes at once) rather than a binary
    search: a search is log2(num_seqs) dependent loads at the start of every program (~0.5 us each).
    """
    count = 0
    for c in range(0, num_seqs, 256):
        s = c + tl.arange(0, 256)
        first_block = tl.load(query_start_loc_ptr + s, mask=s < num_seqs, other=0) // BLOCK_Q + s
        count += tl.sum(((first_block <= q_block_id) & (s < num_seqs)).to(tl.int32), 0)
    return count - 1


@triton.jit
def _dot(a, b, acc, IEEE_DOT: tl.constexpr):
    """a @ b (+ acc): full-precision for fp32 inputs (IEEE_DOT), the tensor cores' default otherwise."""
    if IEEE_DOT:
        out = tl.dot(a, b, acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _rescale_and_add(acc, m_i, l_i, m_sub, p, v, IEEE_DOT: tl.constexpr):
    """The online softmax's tail: rescale the sums to the new max (m_sub, finite) and add p @ v."""
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], IEEE_DOT)
    return acc, l_i


@triton.jit
def _load_k(k_head, row, d, mask, UNMASKED: tl.constexpr, K_ROWS: tl.constexpr):
    """K of the tokens at offsets ``row``: [TILE_N, HEAD_DIM_PAD] rows if K_ROWS, else K^T directly.
    ``mask`` broadcasts to [TILE_N, HEAD_DIM_PAD]; masked values read 0 (the cache may hold NaN)."""
    if K_ROWS:
        if UNMASKED:
            k = tl.load(k_head + row[:, None] + d[None, :])
        else:
            k = tl.load(k_head + row[:, None] + d[None, :], mask=mask, other=0.0)
    else:
        if UNMASKED:
            k = tl.load(k_head + row[None, :] + d[:, None])
        else:
            k = tl.load(k_head + row[None, :] + d[:, None], mask=tl.trans(mask), other=0.0)
    return k


@triton.jit
def _load_v(v_head, row, d, mask, UNMASKED: tl.constexpr):
    """V of the tokens at offsets ``row``, [TILE_N, HEAD_DIM_PAD]; as _load_k."""
    if UNMASKED:
        v = tl.load(v_head + row[:, None] + d[None, :])
    else:
        v = tl.load(v_head + row[:, None] + d[None, :], mask=mask, other=0.0)
    return v


@triton.jit
def _k_operand(k, q, K_ROWS: tl.constexpr):
    """K as the QK^T dot's right operand, in q's dtype: [HEAD_DIM_PAD, TILE_N]."""
    if K_ROWS:
        k = tl.trans(k.to(q.dtype))
    else:
        k = k.to(q.dtype)
    return k


@triton.jit
def _attend_tile(acc, m_i, l_i, q, q_pos, start, kv_end, bt_row, k_head, v_head,
                 stride_kb, stride_kt, stride_vb, stride_vt, scale_log2, sliding_window,
                 d, d_ok, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, MASKED: tl.constexpr,
                 USE_WINDOW: tl.constexpr, IEEE_DOT: tl.constexpr, EVEN_D: tl.constexpr,
                 K_ROWS: tl.constexpr):
    """One online-softmax step over KV positions [start, start + TILE_N).

    acc [BLOCK_M, HEAD_DIM_PAD], m_i / l_i [BLOCK_M] (max in log2 units, sum), q [BLOCK_M, HEAD_DIM_PAD],
    q_pos [BLOCK_M]. MASKED=False promises every position is < kv_end and visible to every row.
    K_ROWS: load K as [TILE_N, HEAD_DIM] rows and transpose for the dot (else load K^T directly).
    """
    pos = start + tl.arange(0, TILE_N)
    if MASKED:
        pos_ok = pos < kv_end
        blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=pos_ok, other=0).to(tl.int64)
        if EVEN_D:
            kv_ok = pos_ok[:, None]
        else:
            kv_ok = pos_ok[:, None] & d_ok[None, :]
    else:
        blk = tl.load(bt_row + pos // BLOCK_SIZE).to(tl.int64)
        kv_ok = d_ok[None, :]
    row = blk * stride_kb + (pos % BLOCK_SIZE) * stride_kt  # [TILE_N] token offsets
    UNMASKED: tl.constexpr = EVEN_D and not MASKED
    k = _k_operand(_load_k(k_head, row, d, kv_ok, UNMASKED, K_ROWS), q, K_ROWS)
    s = _dot(q, k, None, IEEE_DOT)
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
    v = _load_v(v_head, blk * stride_vb + (pos % BLOCK_SIZE) * stride_vt, d, kv_ok, UNMASKED)
    acc, l_i = _rescale_and_add(acc, m_i, l_i, m_sub, p, v.to(q.dtype), IEEE_DOT)
    return acc, m_new, l_i


@triton.jit
def _first_tile(bt_row, k_head, v_head, tile, max_blocks, num_blocks, stride_kb, stride_kt, stride_vb, stride_vt,
                d, d_ok, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, EVEN_D: tl.constexpr,
                K_ROWS: tl.constexpr):
    """K and V of KV tile ``tile``, requested before the sequence's length is known (so unmasked).

    The table index stays inside the row and the block id inside the cache: entries past a
    sequence's last block need not be block ids. _attend_loaded masks positions past the length.
    """
    pos = tile * TILE_N + tl.arange(0, TILE_N)
    blk = tl.load(bt_row + tl.minimum(pos // BLOCK_SIZE, max_blocks - 1))
    blk = tl.minimum(tl.maximum(blk, 0), num_blocks - 1).to(tl.int64)
    k = _load_k(k_head, blk * stride_kb + (pos % BLOCK_SIZE) * stride_kt, d, d_ok[None, :], EVEN_D, K_ROWS)
    v = _load_v(v_head, blk * stride_vb + (pos % BLOCK_SIZE) * stride_vt, d, d_ok[None, :], EVEN_D)
    return k, v, pos


@triton.jit
def _attend_loaded(acc, m_i, l_i, q, q_pos, k, v, pos, kv_end, scale_log2, IEEE_DOT: tl.constexpr,
                   K_ROWS: tl.constexpr):
    """The masked online-softmax step of _attend_tile over a tile _first_tile loaded: positions at or
    past kv_end are masked, and their V (which may be NaN) is zeroed before the dot."""
    pos_ok = pos < kv_end
    s = _dot(q, _k_operand(k, q, K_ROWS), None, IEEE_DOT)
    s = tl.where(pos_ok[None, :] & (pos[None, :] <= q_pos[:, None]), s * scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_sub[:, None])
    acc, l_i = _rescale_and_add(acc, m_i, l_i, m_sub, p, tl.where(pos_ok[:, None], v.to(q.dtype), 0.0), IEEE_DOT)
    return acc, m_new, l_i


@triton.jit
def _program_seq(query_start_loc_ptr, seq_index_ptr, num_seqs, BLOCK_Q: tl.constexpr, DECODE: tl.constexpr,
                 SEQ_INDEX: tl.constexpr):
    """(q-block id, sequence) of this program.

    Last q-blocks first: under a causal mask they read the most KV, so starting them early shortens
    the tail of the launch. DECODE promises one query token per sequence: q-block i is sequence i,
    or with SEQ_INDEX sequence seq_index[i] (the one-token sequences of a mixed batch).
    """
    q_block_id = tl.num_programs(0) - 1 - tl.program_id(0)
    if DECODE:
        if SEQ_INDEX:
            seq = tl.load(seq_index_ptr + q_block_id)
        else:
            seq = q_block_id
    else:
        seq = _find_seq(query_start_loc_ptr, q_block_id, num_seqs, BLOCK_Q)
    return q_block_id, seq


@triton.jit
def _locate(query_start_loc_ptr, seq_lens_ptr, q_block_id, seq, BLOCK_Q: tl.constexpr, DECODE: tl.constexpr):
    """(local q-block, first query token, query length, seq_len) of q-block ``q_block_id`` of ``seq``."""
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if DECODE:
        local_block = 0
    else:
        local_block = q_block_id - (q_start // BLOCK_Q + seq)
    seq_len = tl.load(seq_lens_ptr + seq)
    return local_block, q_start, q_len, seq_len


@triton.jit
def _walk(acc, m_i, l_i, q, q_pos, first_q_pos, kv_start, kv_end, bt_row, k_head, v_head,
          stride_kb, stride_kt, stride_vb, stride_vt, scale_log2, sliding_window, d, d_ok,
          BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, USE_WINDOW: tl.constexpr, IEEE_DOT: tl.constexpr,
          EVEN_D: tl.constexpr, K_ROWS: tl.constexpr):
    """KV positions [kv_start, kv_end) in order, TILE_N at a time.

    Two phases: tiles every row sees whole (all positions <= the block's first query position, so
    no causal mask and no bounds), then the tiles along the diagonal and the sequence end, masked.
    With a window the lower edge needs masks too, so everything goes through the masked phase.
    """
    if USE_WINDOW:
        diag_start = kv_start
    else:
        diag_start = tl.minimum(tl.maximum((first_q_pos + 1) // TILE_N * TILE_N, kv_start), kv_end)
    for start in range(kv_start, diag_start, TILE_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, q_pos, start, kv_end, bt_row, k_head, v_head,
                                     stride_kb, stride_kt, stride_vb, stride_vt, scale_log2, sliding_window,
                                     d, d_ok, BLOCK_SIZE, TILE_N, False, False, IEEE_DOT, EVEN_D, K_ROWS)
    for start in range(diag_start, kv_end, TILE_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, q_pos, start, kv_end, bt_row, k_head, v_head,
                                     stride_kb, stride_kt, stride_vb, stride_vt, scale_log2, sliding_window,
                                     d, d_ok, BLOCK_SIZE, TILE_N, True, USE_WINDOW, IEEE_DOT, EVEN_D, K_ROWS)
    return acc, m_i, l_i


@triton.jit
def _walk_strided(acc, m_i, l_i, q, q_pos, k0, v0, pos0, split, kv_end, num_splits, min_seg,
                  bt_row, k_head, v_head, stride_kb, stride_kt, stride_vb, stride_vt, scale_log2, d, d_ok,
                  BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, SPLIT: tl.constexpr, IEEE_DOT: tl.constexpr,
                  EVEN_D: tl.constexpr, K_ROWS: tl.constexpr):
    """A decode token's KV tiles split, split + n, ... below kv_end, where n is the number of splits
    with work: all of them, but no more than kv_end / min_seg (a short sequence keeps fewer). Tile
    ``split`` arrives loaded (k0, v0); a split past n owns nothing and masks it out."""
    n = 1
    if SPLIT:
        n = tl.minimum(num_splits, tl.maximum(tl.cdiv(kv_end, min_seg), 1))
    owned_end = tl.where(split < n, kv_end, 0)
    acc, m_i, l_i = _attend_loaded(acc, m_i, l_i, q, q_pos, k0, v0, pos0, owned_end, scale_log2, IEEE_DOT, K_ROWS)
    full_tiles = kv_end // TILE_N
    if split < n:
        for t in range(split + n, full_tiles, n):
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, q_pos, t * TILE_N, kv_end, bt_row, k_head, v_head,
                                         stride_kb, stride_kt, stride_vb, stride_vt, scale_log2, 0,
                                         d, d_ok, BLOCK_SIZE, TILE_N, False, False, IEEE_DOT, EVEN_D, K_ROWS)
        # the sequence's last, partial tile (number full_tiles), when it is this split's and not
        # tile `split` itself
        if (kv_end % TILE_N != 0) & (full_tiles > split) & ((full_tiles - split) % n == 0):
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, q_pos, full_tiles * TILE_N, kv_end, bt_row, k_head,
                                         v_head, stride_kb, stride_kt, stride_vb, stride_vt, scale_log2, 0,
                                         d, d_ok, BLOCK_SIZE, TILE_N, True, False, IEEE_DOT, EVEN_D, K_ROWS)
    return acc, m_i, l_i


# Runtime ints that change from step to step are not specialised on (divisible by 16, equal to 1):
# each new combination would compile a variant in the middle of serving, a stall of seconds.
@triton.jit(do_not_specialize=["num_seqs", "min_seg", "num_splits", "max_blocks", "num_blocks"])
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
    seq_index_ptr,  # [grid axis 0] int32: the sequences of a DECODE launch; read only if SEQ_INDEX
    k_scale_ptr, v_scale_ptr,  # fp32 [num_kv_heads] dequantisation scales; read only if KV_FP8
    scale_log2,  # softmax scale * log2(e): scores are kept in log2 units so exp2 is used
    num_seqs,
    sliding_window,  # keys with position > query position - sliding_window; read only if USE_WINDOW
    min_seg,  # fewest KV positions per split (a multiple of TILE_N); read only if SPLIT
    num_splits,  # read only if SPLIT
    stride_qt, stride_qh,
    stride_ot, stride_oh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    max_blocks,  # block_tables.shape[1]; read only if STRIDED
    num_blocks,  # k_cache.shape[0]; read only if STRIDED
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
    DECODE: tl.constexpr,  # one query token per sequence (grid axis 0 = sequences)
    KV_FP8: tl.constexpr,  # the cache holds e4m3 values scaled by 1 / k_scale, 1 / v_scale
    K_ROWS: tl.constexpr,  # load K as rows (see _attend_tile)
    SEQ_INDEX: tl.constexpr,  # DECODE over the sequences listed in seq_index only
    SKIP_SINGLE: tl.constexpr,  # leave one-token sequences alone (a SEQ_INDEX launch does them)
    FP8_VIA_F16: tl.constexpr,  # KV_FP8 with a bf16 query: convert tiles to f16, not bf16 (see below)
    STRIDED: tl.constexpr,  # DECODE without a window: splits take every n-th tile (below)
):
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    EVEN_D: tl.constexpr = HEAD_DIM == HEAD_DIM_PAD
    d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = d < HEAD_DIM
    k_head = k_cache_ptr + kvh * stride_kh
    v_head = v_cache_ptr + kvh * stride_vh
    q_block_id, seq = _program_seq(query_start_loc_ptr, seq_index_ptr, num_seqs, BLOCK_Q, DECODE, SEQ_INDEX)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    if STRIDED:
        # A decode split owns tiles split, split + n, split + 2n, ... (n splits that have work), so
        # its first tile is known before the sequence's length: its block ids, K and V go out first,
        # beside the length, and are masked when it arrives. That takes one of three dependent memory
        # latencies (seq_lens, then the block table, then K) off every decode program.
        k0, v0, pos0 = _first_tile(bt_row, k_head, v_head, split, max_blocks, num_blocks, stride_kb, stride_kt,
                                   stride_vb, stride_vt, d, d_ok, BLOCK_SIZE, TILE_N, EVEN_D, K_ROWS)
    local_block, q_start, q_len, seq_len = _locate(query_start_loc_ptr, seq_lens_ptr, q_block_id, seq, BLOCK_Q,
                                                   DECODE)
    if local_block * BLOCK_Q >= q_len:
        return  # past this sequence's last q-block (the grid is an upper bound)
    if SKIP_SINGLE:
        if q_len == 1:
            return
    ctx_len = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    q_local = local_block * BLOCK_Q + rows // QPK  # query token index within the sequence
    head = kvh * QPK + rows % QPK
    row_ok = (rows < BLOCK_Q * QPK) & (q_local < q_len)
    q_pos = ctx_len + q_local  # [BLOCK_M] position of each row's token
    tok = (q_start + q_local).to(tl.int64)
    q = tl.load(query_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if KV_FP8:
        scale_log2 = scale_log2 * tl.load(k_scale_ptr + kvh)
        if FP8_VIA_F16:
            # the dots run in fp16 (the tiles are converted to q's dtype): e4m3 -> f16 is one cvt per
            # two values on sm_90, e4m3 -> bf16 goes through f32; e4m3 values are exact in f16
            q = q.to(tl.float16)

    # KV positions this program reads: up to the block's last query position (causal) ...
    first_q_pos = ctx_len + local_block * BLOCK_Q
    kv_end = tl.minimum(first_q_pos + BLOCK_Q, seq_len)
    kv_start = 0
    if USE_WINDOW:  # ... and from the first query's window start, rounded down to a tile
        kv_start = tl.maximum(first_q_pos - sliding_window + 1, 0)
        kv_start = (kv_start // TILE_N) * TILE_N
    if SPLIT and not STRIDED:  # ... within this split's share of the q-block's own range (aligned tiles)
        seg = tl.cdiv(tl.cdiv(kv_end - kv_start, num_splits), TILE_N) * TILE_N
        seg = tl.maximum(seg, min_seg)
        kv_start = kv_start + split * seg
        kv_end = tl.minimum(kv_end, kv_start + seg)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    if STRIDED:
        acc, m_i, l_i = _walk_strided(acc, m_i, l_i, q, q_pos, k0, v0, pos0, split, kv_end, num_splits, min_seg,
                                      bt_row, k_head, v_head, stride_kb, stride_kt, stride_vb, stride_vt,
                                      scale_log2, d, d_ok, BLOCK_SIZE, TILE_N, SPLIT, IEEE_DOT, EVEN_D, K_ROWS)
    else:
        acc, m_i, l_i = _walk(acc, m_i, l_i, q, q_pos, first_q_pos, kv_start, kv_end, bt_row, k_head, v_head,
                              stride_kb, stride_kt, stride_vb, stride_vt, scale_log2, sliding_window, d, d_ok,
                              BLOCK_SIZE, TILE_N, USE_WINDOW, IEEE_DOT, EVEN_D, K_ROWS)
    if KV_FP8:
        acc = acc * tl.load(v_scale_ptr + kvh)

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


@triton.jit(do_not_specialize=["num_seqs", "num_splits"])
def _merge_splits_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    part_acc_ptr,  # [num_tokens, num_heads, num_splits, HEAD_DIM_PAD] fp32
    part_ml_ptr,  # [num_tokens, num_heads, num_splits, 2] fp32
    query_start_loc_ptr,  # [num_seqs + 1] int32: tokens past query_start_loc[num_seqs] are not written
    num_seqs,
    num_splits,
    stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    SPLITS_PAD: tl.constexpr,  # power of 2 >= num_splits
):
    tok = tl.program_id(0)
    head = tl.program_id(1)
    # The token count is loaded beside the partials, not before them: one memory latency less on a
    # path of three. A padded graph row then merges partials nobody wrote and stores nothing.
    num_real = tl.load(query_start_loc_ptr + num_seqs)
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
             mask=(d < HEAD_DIM) & (tl.full([HEAD_DIM_PAD], tok, tl.int32) < num_real))
