"""Paged attention for a batch that mixes prefill chunks and decode tokens (causal, GQA, sliding window).

Inputs follow engine_svc/attention/base.py: queries packed along dim 0, a paged KV cache
``[num_blocks, block_size, num_kv_heads, head_dim]`` that already holds every position a query attends
to, and one block table per sequence::

    seq:          0            1     2
    query tokens: [q q q q]    [q]   [q q]      query_start_loc = [0, 4, 5, 7]
    context:      |---c0---|q| |-c1-|q|  ...    seq_lens = context + new query tokens

Query token j of sequence s sits at position ``seq_lens[s] - query_len[s] + j``.

The programs (kernels/paged_attention_kernels.py) run on one of two paths, chosen by ``_plan``:
  * one pass: grid (q_blocks, kv_heads); each program writes its final output.
  * split-KV (flash-decoding): grid (q_blocks, kv_heads, num_splits); each program covers one share
    of its q-block's KV positions and writes an unnormalised partial (acc, max, sum); a second kernel
    merges the splits. Used when the one-pass grid has too few programs to fill the GPU (few
    sequences, ``_pick_splits``). The shares are cut on the device from
    each sequence's own length, so a plan made for a CUDA graph (num_splits from the batch size alone)
    fits every context length it replays with. Latency-bound decode launches deal the tiles round
    robin instead (split s takes tiles s, s + n, ...), so that a program's first tile is known before
    its sequence's length and loads beside it (``strided`` in the plan).

The KV cache may be the query's dtype or float8_e4m3fn (``k_scale`` / ``v_scale``: per tensor or per
KV head); FP8 tiles are dequantised in registers, to fp16 under a bf16 query (a cheaper conversion on
sm_90 than to bf16, and exact for e4m3 values).
"""

from __future__ import annotations

import functools
import math

import torch

from kernels._checks import FLOAT_DTYPES, FP8_DTYPES, check_shape, check_tensor, kv_scale_tensor, next_pow2
from kernels.paged_attention_kernels import _merge_splits_kernel, _paged_attention_kernel
from kernels.prefill_attention import prefill_attention
from kernels.prefill_attention import suits as prefill_attention_suits

LOG2E = 1.4426950408889634
MAX_SPLITS = 64  # partial buffers and the merge tile scale with this
MIN_SPLIT_POSITIONS = 128  # one decode tile: shorter splits only add partials to merge

# Prefill / mixed-batch tiles by padded head dim: (BLOCK_M, TILE_N, num_warps, num_stages), from the
# in-run sweeps of bench/kernels.py (bench/KERNELS_NOTES.md has each measurement).
# Decode-like tiles by padded head dim: (TILE_N, num_warps, num_stages); BLOCK_M is 16 (one decode token's
# QPK heads). bench/kernels.py --pick times candidates in-run; the notes keep each measurement.
DECODE_TILES = {128: (128, 4, 4), 256: (64, 4, 2)}
DECODE_TILES_FP8 = {128: (128, 4, 4), 256: (64, 4, 2)}  # e4m3 tiles hold half the bytes: maybe longer
# K is loaded as [TILE_N, head_dim] rows and transposed for the dot (+10% at head dim 128 on the H200).
PREFILL_TILES = {64: (128, 64, 4, 3), 128: (128, 128, 8, 4), 256: (64, 64, 4, 2)}
# Launches of at most SHORT_PREFILL_TOKENS tokens (the engine's mixed-step CUDA graphs) at head dim 128:
# 64x64 tiles, 4 warps. They compute as fast as 128x128 / 8 warps on chunks of 2k tokens (0.898 vs
# 0.897 ms at B=8 ctx 2048 in the H200 sweep; 8% slower only on 8k prompts), and take ~110 KB of
# shared memory instead of ~160 KB, so two programs fit an SM instead of one. That matters in a
# mixed graph, whose grid is an upper bound (padded tokens / BLOCK_Q + every buffer row) and mostly
# programs that exit at once: 1.40 ms a step for a 512-token prompt beside 200 decode rows, one
# program per SM at a time (bench/results/step-profile-*-7ee8b3e-windows.json).
SHORT_PREFILL_TOKENS = 2048
SHORT_PREFILL_TILES = {64: PREFILL_TILES[64], 128: (64, 64, 4, 3), 256: PREFILL_TILES[256]}


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


# Decode launches of fewer programs per SM than this are latency-bound: they split for ~2 per SM and
# take the kernel's STRIDED path (B=32 at 8 KV heads, 256 programs on 132 SMs, is past it).
LATENCY_BOUND_PROGRAMS_PER_SM = 1.5


def _decode_like(max_query_len: int, qpk: int) -> bool:
    """A batch whose q-blocks fit the 16-row decode tiles: its query tokens x QPK heads <= 64 rows."""
    return max_query_len * qpk <= 64


def _pick_splits(programs, max_seq_len, num_sms) -> int:
    """KV splits for a decode-like batch of ``programs`` one-pass programs (each split gets at least
    MIN_SPLIT_POSITIONS positions: the plan's min_seg).

    Under 1.5 programs per SM: enough splits for ~2 programs per SM (the best of the H200 sweep at
    B=1-8, ctx 512-8192: 4 per SM lost 5-15%), at most MAX_SPLITS, rounded down to a power of 2
    (powers of 2 were best in every split sweep; see bench/KERNELS_NOTES.md), but no more than one
    split per MIN_SPLIT_POSITIONS-position tile, rounded *up* to a power of 2. Up, because a split of
    two tiles waits on both: rounded down (as until round 6), max_seq_len 513-1023 got 4 splits of up
    to 2 tiles, and the B=1 decode attention of the mix's steady window at ctx ~520 took 9.0 + 1.5 us
    a layer (attention + merge) against 6.6 + 2.0 us with 32 splits of one tile
    (step-profile-llama3-8b-h200-2026-12-02-01c403c.json against *-2026-12-01-6378ac6.json). The
    splits past a short sequence's tiles exit at once, so a graph of length 128 x 2^k serves every
    length above 128 x 2^(k-1) with one tile a split.
    More programs: one pass. Forced counts at B=32-128, ctx 1k-8k, one run (round 6,
    kernels-h200-2026-12-02-f951ed4-splits.json): one pass was the fastest of 1-4 splits at every B
    of 64 and more (B=64 ctx 4096 0.263 ms against 0.276 with 2 splits) and at B=32; so the wave-fill
    split of round 4 (2 splits at B=50-74 / 100-123 from 4096 positions, when B=64 ctx 4096 measured
    0.293 in one pass against 0.275) is gone. B=48 was the exception (2 splits 7-9% faster at 4k-8k).
    """
    if programs >= LATENCY_BOUND_PROGRAMS_PER_SM * num_sms:
        return 1
    most = min(MAX_SPLITS, math.ceil(2 * num_sms / programs))
    tiles = math.ceil(max_seq_len / MIN_SPLIT_POSITIONS)
    return min(1 << (most.bit_length() - 1), next_pow2(tiles))


def _plan(head_dim_pad, qpk, num_tokens, num_seqs, num_kv_heads, max_query_len, max_seq_len, num_splits,
          num_sms, interpret, kv_fp8=False):
    """Tile sizes, launch options and the number of KV splits.

    Decode-like batches (max_query_len * QPK <= 64) use BLOCK_M = 16 rows (the smallest tile tl.dot
    takes), so a decode token's QPK heads fill the rows and little compute is wasted, and long KV
    tiles with deep pipelining (memory-bound); longer queries take PREFILL_TILES (compute-bound). The
    interpreter gets small tiles so CPU tests exercise many tiles per sequence.

    Splits (num_splits None): ``_pick_splits`` for decode-like batches (max_query_len <= 16), else 1.
    (On the CPU interpreter only forced split counts split: the tests reach every share that way.)
    A graph captured with max_seq_len = the model's limit gets the split count of its batch size, and
    the kernel sizes each sequence's splits from its own length (at least min_seg positions each).
    """
    decode_like = _decode_like(max_query_len, qpk)
    if decode_like:
        block_m = max(16, next_pow2(qpk))
        tiles = DECODE_TILES_FP8 if kv_fp8 else DECODE_TILES
        tile_n, num_warps, num_stages = tiles[128 if head_dim_pad <= 128 else 256]
        if interpret:
            tile_n = 32
    else:
        tiles = SHORT_PREFILL_TILES if num_tokens <= SHORT_PREFILL_TOKENS else PREFILL_TILES
        block_m, tile_n, num_warps, num_stages = tiles[min(256, max(64, head_dim_pad))]
        if interpret:
            block_m, tile_n = 32, 32
        block_m = max(block_m, next_pow2(qpk))
    # a forced split count cuts exact shares (tests reach every split); the heuristic keeps a floor
    plan = dict(block_m=block_m, tile_n=tile_n, num_warps=num_warps, num_stages=num_stages,
                k_rows=not decode_like,
                decode=max_query_len == 1, num_splits=num_splits,
                min_seg=MIN_SPLIT_POSITIONS if num_splits is None else tile_n)
    # programs that do work: one q-block per decode sequence, about num_tokens / BLOCK_Q otherwise
    programs = max(num_seqs, math.ceil(num_tokens / (block_m // qpk))) * num_kv_heads
    # Decode batches of under ~1.5 programs per SM are latency-bound: their programs load their first
    # KV tile before the sequence's length (the kernel's STRIDED path), at a cost in registers that
    # matters only where several programs share an SM. The interpreter always takes it (CPU tests).
    plan["strided"] = plan["decode"] and (interpret or programs < LATENCY_BOUND_PROGRAMS_PER_SM * num_sms)
    if num_splits is None:
        plan["num_splits"] = 1
        if not interpret and max_query_len <= 16:
            plan["num_splits"] = _pick_splits(programs, max_seq_len, num_sms)
    return _derive(plan, qpk, num_tokens, num_seqs, max_seq_len)


def decode_graph_lengths(num_seqs: int, num_heads: int, num_kv_heads: int, head_dim: int, max_model_len: int,
                         device: torch.device, kv_fp8: bool = False) -> list[int]:
    """The max_seq_len values to capture pure-decode CUDA graphs of ``num_seqs`` sequences at, ascending;
    the last is max_model_len.

    A graph serves every batch no longer than the max_seq_len it was captured at (the kernel cuts the
    splits on the device), but it keeps that length's split count. Captured at the model's limit, B=64
    splits in two at every context, the second split empty below 2k positions (0.0585 ms at ctx 512
    against 0.0509 ms in one pass on the H200, bench/results/kernels-h200-2026-12-01-42d442e.json),
    and B=1 gets 32 splits where 4 have work (0.0136 against 0.0124 ms). So: one graph per distinct
    launch plan. The runner replays the one of the shortest length >= the batch's max_seq_len, whose
    plan is then the plan the batch gets without a graph.
    """
    return _graph_lengths(num_seqs, num_heads // num_kv_heads, num_kv_heads, max(16, next_pow2(head_dim)),
                          max_model_len, _num_sms(device), device.type != "cuda", kv_fp8)


def _graph_lengths(num_seqs, qpk, num_kv_heads, head_dim_pad, max_model_len, num_sms, interpret, kv_fp8):
    """decode_graph_lengths on plain ints. A decode plan changes with max_seq_len only just past
    MIN_SPLIT_POSITIONS x 2^k (the split count is a power of 2 at or above its tiles), so the
    candidates are those lengths and the limit; of a run of candidates with one plan the longest is
    kept."""
    candidates = {max_model_len}
    k = 0
    while (MIN_SPLIT_POSITIONS << k) <= max_model_len:
        candidates.add(MIN_SPLIT_POSITIONS << k)
        k += 1
    kept, longer_plan = [], None
    for length in sorted(candidates, reverse=True):
        plan = _plan(head_dim_pad, qpk, num_seqs, num_seqs, num_kv_heads, 1, length, None, num_sms, interpret,
                     kv_fp8)
        if plan != longer_plan:
            kept.append(length)
        longer_plan = plan
    return sorted(kept)


def _derive(plan, qpk, num_tokens, num_seqs, max_seq_len):
    """Fill in what follows from the tiles: block_q, the grid's axis 0, the clamped split count, min_seg."""
    tile_n = plan["tile_n"]
    plan["block_q"] = plan["block_m"] // qpk
    plan["grid0"] = num_seqs if plan["decode"] else num_tokens // plan["block_q"] + num_seqs
    # no more splits than the power of 2 at or above the tiles there are (the rest would only exit)
    plan["num_splits"] = max(1, min(int(plan["num_splits"]), MAX_SPLITS, next_pow2(math.ceil(max_seq_len / tile_n))))
    plan["min_seg"] = max(tile_n, plan["min_seg"] // tile_n * tile_n)
    return plan


def _check_inputs(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, max_query_len,
                  max_seq_len, scale, sliding_window) -> None:
    """The launcher's argument checks (ValueError naming the argument); see paged_attention."""
    dev = query.device
    check_tensor("query", query, ndim=3, dtypes=FLOAT_DTYPES, device=dev)
    _, num_heads, head_dim = query.shape
    check_tensor("k_cache", k_cache, ndim=4, dtypes=(query.dtype,) + FP8_DTYPES, device=dev)
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    check_tensor("v_cache", v_cache, ndim=4, dtypes=(k_cache.dtype,), device=dev)
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
                    k_scale=1.0, v_scale=1.0, num_splits: int | None = None, plan_overrides: dict | None = None,
                    decode_seq_index=None, key=None, value=None, min_query_len: int = 1,
                    max_prefix_len: int | None = None):
    """Causal attention of packed varlen queries over a paged KV cache.

    Args:
        query: ``[num_tokens, num_heads, head_dim]`` fp16/bf16/fp32 (fp32 runs ieee dots, for tests and
            fp32 models); token/head strides free, head_dim stride 1.
        k_cache, v_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``, query's dtype or
            float8_e4m3fn, head_dim stride 1; num_heads a multiple of num_kv_heads; head_dim <= 256.
        block_tables: int32 ``[num_seqs, max_blocks]``, column stride 1.
        query_start_loc: int32 ``[num_seqs + 1]`` contiguous, cumulative query lengths.
        seq_lens: int32 ``[num_seqs]`` contiguous, context + query tokens per sequence.
        max_query_len, max_seq_len: host ints, upper bounds over the batch (they pick tiles and splits;
            a CUDA graph may pass the model's limit as max_seq_len: splits adapt on the device).
        scale: softmax scale (usually head_dim ** -0.5).
        sliding_window: keys at positions > query position - sliding_window only; None = full.
        out: optional ``[num_tokens, num_heads, head_dim]`` output, query's dtype, head_dim stride 1.
        k_scale, v_scale: FP8 caches only: the cache holds x / scale; a float (per tensor) or an fp32
            tensor of num_kv_heads values (per head).
        num_splits: force the number of KV splits (1 = one-pass); None = heuristic in ``_plan``.
        plan_overrides: for tuning (bench/kernels.py): replace entries of ``_plan``'s result
            (block_m, tile_n, num_warps, num_stages, num_splits, min_seg, k_rows, strided, fp8_via_f16); the
            rest is re-derived.
        decode_seq_index: int32 ``[n]``: every sequence of the batch with one query token (a mixed
            batch's decode rows). Two launches then: the longer sequences with the prefill tiles, and
            these with the decode tiles (16 rows, one pass), instead of one 128-row prefill tile per
            decode token (2x the attention time of 200 decode rows beside one 512-token prompt on the
            H200, bench/results/step-profile-*). Ignored when max_query_len is 1.
        key, value: optional ``[num_tokens, num_kv_heads, head_dim]``: this step's K/V of the query
            tokens (already in the cache). Given, a prefill batch with a chunk of over 2k tokens runs
            kernels/prefill_attention.py, which reads them contiguously through TMA descriptors and
            only the cached prefix through the block table (0.85-0.94x SDPA against 0.66-0.70x).
        min_query_len: host int, a lower bound on every sequence's query length (1: unknown). Over 1,
            a launch of over 1024 tokens takes that path too (prefill_attention.suits).
        max_prefix_len: host int, an upper bound on every sequence's cached prefix (seq_len - query
            length; None: unknown). 0 (fresh prompts only) lets that path compile out its prefix loop.

    Returns:
        ``out`` (allocated when not given). Rows of tokens past ``query_start_loc[-1]`` are not written.

    Raises:
        ValueError: on a dtype, shape, stride, device or argument-range mismatch.

    Grid: axis 0 = ``num_tokens // BLOCK_Q + num_seqs``, an upper bound on the q-blocks of all
    sequences (sequence s owns ``ceil(query_len_s / BLOCK_Q)`` blocks starting at global id
    ``query_start_loc[s] // BLOCK_Q + s``; programs past a sequence's blocks exit at once), or
    num_seqs for a pure decode batch (max_query_len == 1); axis 1 = KV heads; axis 2 = KV splits.
    """
    _check_inputs(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, max_query_len, max_seq_len,
                  scale, sliding_window)
    dev = query.device
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    num_seqs = block_tables.shape[0]
    kv_fp8 = k_cache.dtype in FP8_DTYPES
    k_scales = kv_scale_tensor("k_scale", k_scale, num_kv_heads, dev) if kv_fp8 else query
    v_scales = kv_scale_tensor("v_scale", v_scale, num_kv_heads, dev) if kv_fp8 else query
    if out is None:
        out = torch.empty_like(query, memory_format=torch.contiguous_format)
    else:
        check_tensor("out", out, ndim=3, dtypes=(query.dtype,), device=dev)
        check_shape("out", out, tuple(query.shape))
    if num_tokens == 0 or num_seqs == 0:
        return out

    qpk = num_heads // num_kv_heads
    head_dim_pad = max(16, next_pow2(head_dim))
    if decode_seq_index is not None and max_query_len > 1:
        check_tensor("decode_seq_index", decode_seq_index, ndim=1, dtypes=(torch.int32,), contiguous=True, device=dev)
        singles = decode_seq_index.shape[0]
    else:
        singles = 0
    prefill_tiles = not _decode_like(max_query_len, qpk)
    if prefill_tiles and (key is not None or value is not None):  # decode launches never read them
        _check_fresh_kv(query, key, value, num_kv_heads)
    if (key is not None and prefill_tiles and not plan_overrides and num_splits in (None, 1)
            and prefill_attention_suits(query, key, value, out, k_cache, sliding_window, max_query_len,
                                        min_query_len)):
        prefill_attention(query, key, value, k_cache, v_cache, block_tables, query_start_loc, seq_lens,
                          max_query_len, scale, out, skip_single=singles > 0, has_prefix=max_prefix_len != 0)
    else:
        plan = _plan(head_dim_pad, qpk, num_tokens, num_seqs, num_kv_heads, max_query_len, max_seq_len, num_splits,
                     _num_sms(dev), interpret=dev.type != "cuda", kv_fp8=kv_fp8)
        if plan_overrides:
            plan = _derive({**plan, **plan_overrides}, qpk, num_tokens, num_seqs, max_seq_len)
        plan["skip_single"] = singles > 0
        _launch(plan, out, query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, k_scales, v_scales,
                scale, sliding_window, kv_fp8)
    if singles:
        # one pass: the merge kernel would rewrite every token of the batch, not only these
        plan = _plan(head_dim_pad, qpk, singles, singles, num_kv_heads, 1, max_seq_len, 1, _num_sms(dev),
                     interpret=dev.type != "cuda", kv_fp8=kv_fp8)
        plan["seq_index"] = decode_seq_index
        _launch(plan, out, query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, k_scales, v_scales,
                scale, sliding_window, kv_fp8)
    return out


def _check_fresh_kv(query, key, value, num_kv_heads) -> None:
    """key/value, when given, are this step's K/V of the query tokens: both, query's dtype and length."""
    num_tokens, _, head_dim = query.shape
    for name, x in (("key", key), ("value", value)):
        if x is None:
            raise ValueError(f"{name}: missing; key and value go together")
        check_tensor(name, x, ndim=3, dtypes=(query.dtype,), device=query.device)
        if tuple(x.shape) != (num_tokens, num_kv_heads, head_dim):
            raise ValueError(f"{name}: expected shape {(num_tokens, num_kv_heads, head_dim)}, got {tuple(x.shape)}")


def _launch(plan, out, query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, k_scales, v_scales,
            scale, sliding_window, kv_fp8) -> None:
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads, num_seqs = k_cache.shape[2], block_tables.shape[0]
    head_dim_pad = max(16, next_pow2(head_dim))
    split = plan["num_splits"] > 1
    if split:
        part_acc = torch.empty(num_tokens, num_heads, plan["num_splits"], head_dim_pad, dtype=torch.float32,
                               device=query.device)
        part_ml = torch.empty(num_tokens, num_heads, plan["num_splits"], 2, dtype=torch.float32,
                              device=query.device)
    else:
        part_acc = part_ml = out  # unused by the kernel
    grid = (plan["grid0"], num_kv_heads, plan["num_splits"])
    seq_index = plan.get("seq_index")
    _paged_attention_kernel[grid](
        out, part_acc, part_ml, query, k_cache, v_cache, block_tables, query_start_loc, seq_lens,
        seq_lens if seq_index is None else seq_index, k_scales, v_scales, scale * LOG2E, num_seqs,
        sliding_window or 0, plan["min_seg"], plan["num_splits"],
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), block_tables.shape[1], k_cache.shape[0],
        QPK=num_heads // num_kv_heads, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=k_cache.shape[1], BLOCK_M=plan["block_m"], BLOCK_Q=plan["block_q"], TILE_N=plan["tile_n"],
        USE_WINDOW=sliding_window is not None, SPLIT=split, IEEE_DOT=query.dtype == torch.float32,
        DECODE=plan["decode"], KV_FP8=kv_fp8, K_ROWS=plan["k_rows"],
        SEQ_INDEX=seq_index is not None, SKIP_SINGLE=bool(plan.get("skip_single")),
        FP8_VIA_F16=kv_fp8 and query.dtype == torch.bfloat16 and plan.get("fp8_via_f16", True),
        STRIDED=plan["strided"] and sliding_window is None,
        num_warps=plan["num_warps"], num_stages=plan["num_stages"],
    )
    if split:
        _merge_splits_kernel[(num_tokens, num_heads)](
            out, part_acc, part_ml, query_start_loc, num_seqs, plan["num_splits"], out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, SPLITS_PAD=next_pow2(plan["num_splits"]),
            num_warps=4,
        )


def paged_attention_reference(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens,
                              max_query_len: int, max_seq_len: int, scale: float,
                              sliding_window: int | None = None, out=None, *, k_scale=1.0, v_scale=1.0):
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
        k = gather_dequantized(k_cache, blocks, k_scale)[:seq_len]  # [n, Hkv, D] fp32
        v = gather_dequantized(v_cache, blocks, v_scale)[:seq_len]
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


def gather_dequantized(cache: torch.Tensor, blocks: torch.Tensor, scale=1.0) -> torch.Tensor:
    """``cache[blocks]`` as fp32 ``[len(blocks) * block_size, num_kv_heads, head_dim]``; an FP8 cache is
    dequantised with ``scale`` (float, or per KV head). Gathers FP8 bytes through a uint8 view (torch
    has no CPU indexing kernels for float8)."""
    _, block_size, num_kv_heads, head_dim = cache.shape
    if cache.dtype not in FP8_DTYPES:
        return cache[blocks].reshape(-1, num_kv_heads, head_dim).float()
    raw = cache.view(torch.uint8)[blocks].view(cache.dtype).float()
    if isinstance(scale, torch.Tensor):
        scale = scale.float().reshape(-1, 1).to(raw.device)  # [1 or Hkv, 1] against [..., Hkv, D]
    return raw.reshape(-1, num_kv_heads, head_dim) * scale
