"""paged_attention against paged_attention_reference: CPU (interpreter, small) and GPU (real sizes)."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_cases import DEVICE, assert_close, make_batch

from kernels.paged_attention import (PREFILL_TILES, SHORT_PREFILL_TILES, SHORT_PREFILL_TOKENS, _graph_lengths, _plan,
                                     paged_attention, paged_attention_reference)

BS = 16  # block size for the CPU cases


def check(seqs, *, num_kv_heads=2, qpk=2, head_dim=64, block_size=BS, dtype=torch.float32, window=None,
          num_splits=None, device=DEVICE, scale=None, index_singles=False):
    b = make_batch(seqs, num_kv_heads=num_kv_heads, qpk=qpk, head_dim=head_dim, block_size=block_size,
                   dtype=dtype, device=device)
    scale = scale or head_dim ** -0.5
    out = torch.full_like(b.query, float("nan"), memory_format=torch.contiguous_format)
    singles = None
    if index_singles:  # the one-token sequences as the model runner lists them for a mixed batch
        q_lens = (b.query_start_loc[1:] - b.query_start_loc[:-1]).cpu()
        singles = torch.nonzero(q_lens == 1).flatten().to(torch.int32).to(device)
    got = paged_attention(*b.args(), scale, window, out=out, num_splits=num_splits, decode_seq_index=singles)
    assert got is out
    ref = paged_attention_reference(*b.args(), scale, window)
    assert_close(out, ref, dtype)


# decode: every length class around the block size, incl. 1 and the cache's last block (make_batch)
# (32 and 64 are KV-tile multiples in the interpreter: the last full tile goes unmasked)
DECODE_LENS = [1, BS - 1, BS, BS + 1, 32, 33, 2 * BS + 3, 64, 77]


@pytest.mark.parametrize("qpk", [1, 2, 4])
def test_decode_lengths(qpk):
    check([(n - 1, 1) for n in DECODE_LENS], qpk=qpk)


# mixed: fresh prefill, decode, prefix-cached chunks (context not a block multiple), tiny sequences
MIXED = [(0, 19), (BS - 1, 1), (21, 9), (0, 1), (BS + 1, 1), (2 * BS, BS), (5, 40)]


@pytest.mark.parametrize("qpk,num_kv_heads", [(1, 3), (2, 2), (4, 1)])
def test_mixed_prefill_decode(qpk, num_kv_heads):
    check(MIXED, qpk=qpk, num_kv_heads=num_kv_heads)


@pytest.mark.parametrize("qpk,num_kv_heads,window", [(1, 3, None), (4, 1, None), (2, 2, 5)])
def test_mixed_with_decode_rows_indexed(qpk, num_kv_heads, window):
    # decode rows first, last and between prefill chunks; each launch must leave the other's rows
    check([(BS + 1, 1)] + MIXED + [(40, 1), (0, 1)], qpk=qpk, num_kv_heads=num_kv_heads, window=window,
          index_singles=True)


def test_indexed_decode_rows_with_nothing_else_to_do():
    # only one-token sequences listed, but max_query_len > 1 comes from the one prefill chunk
    check([(7, 1), (0, 3), (BS, 1)], index_singles=True)


@pytest.mark.parametrize("head_dim", [80, 96, 128, 256])
def test_head_dims(head_dim):
    check([(3, 5), (BS + 1, 1), (0, 2)], head_dim=head_dim, num_kv_heads=1)


@pytest.mark.parametrize("block_size", [8, 64])
def test_block_sizes(block_size):
    # 8: a KV tile spans several blocks; 64: several tiles per block
    check([(block_size - 1, 1), (block_size + 1, 3), (0, block_size + 2)], block_size=block_size)


@pytest.mark.parametrize("window", [1, 5, BS + 3])
def test_sliding_window(window):
    # (30 + window, 1): the window starts at position 31, just before a KV tile boundary (32 here)
    check(MIXED + [(30 + window, 1), (40, 1)], window=window)


@pytest.mark.parametrize("num_splits,window", [(2, None), (3, None), (7, 6), (64, None)])
def test_split_kv(num_splits, window):
    # 64 splits exceed the tiles of short sequences: empty splits must merge to nothing
    check([(90, 1), (0, 1), (BS, 1), (40, 6), (3, 30)], num_splits=num_splits, window=window)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_peaky_scores(num_splits):
    # scores spread over hundreds of units: the running max must track them without under/overflow
    check(MIXED, scale=4.0, num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [3, 64])
def test_split_kv_decode_only(num_splits):
    # max_query_len == 1 takes the decode grid (one q-block per sequence, no search)
    check([(90, 1), (0, 1), (BS, 1), (200, 1), (BS - 2, 1)], num_splits=num_splits, qpk=4, num_kv_heads=1)


@pytest.mark.parametrize("num_splits", [None, 2, 3, 5])
def test_decode_strided_splits_poisoned_tables(num_splits):
    # Decode splits take tiles split, split + n, ... and load their first tile before the length is
    # known, so table entries past a sequence are read: here they are garbage (negative, past the
    # cache) and must be clamped and masked. Lengths cover tile boundaries (32 in the interpreter)
    # on both sides and splits with no tile.
    seqs = [(n - 1, 1) for n in (1, 31, 32, 33, 64, 95, 96, 97, 160, 161)]
    b = make_batch(seqs, num_kv_heads=2, qpk=4, head_dim=64, block_size=BS, device=DEVICE)
    used = [-(-(c + q) // BS) for c, q in seqs]
    for s, n in enumerate(used):
        b.block_tables[s, n:] = -7 if s % 2 else 10**9
    out = torch.full_like(b.query, float("nan"), memory_format=torch.contiguous_format)
    paged_attention(*b.args(), 64 ** -0.5, None, out=out, num_splits=num_splits)
    assert_close(out, paged_attention_reference(*b.args(), 64 ** -0.5), torch.float32)


def test_gqa_ratio_not_power_of_two():
    check([(10, 3), (0, 1)], qpk=3, num_kv_heads=2)


# Triton 3.9's interpreter computes bf16 tl.dot wrongly (a bare 16x16 bf16 dot is off by 1e10), so
# bf16 runs only compiled; the GPU tests below cover it at real sizes.
HALF_DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_dtypes(dtype):
    check([(20, 1), (5, 7)], dtype=dtype)


def test_empty_query_is_a_noop():
    b = make_batch([(4, 1)], num_kv_heads=1, qpk=1, head_dim=64, block_size=BS, device=DEVICE)
    q = b.query[:0]
    qsl = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    out = paged_attention(q, b.k_cache, b.v_cache, b.block_tables[:0], qsl, b.seq_lens[:0], 1, 1, 1.0)
    assert out.shape == q.shape


def test_plan_heuristic():
    def plan(num_tokens, num_seqs, max_query_len, max_seq_len):
        return _plan(128, 4, num_tokens, num_seqs, 8, max_query_len, max_seq_len, None, num_sms=132,
                     interpret=False)

    # B=1 decode at 32k over 8 KV heads: 8 programs -> ~2 per SM needs 33 splits, rounded down to 32
    p = plan(1, 1, 1, 32768)
    assert p["num_splits"] == 32 and p["min_seg"] % p["tile_n"] == 0
    assert p["decode"] and p["grid0"] == 1  # pure decode: one program row per sequence, no search
    # a CUDA graph captured at the model's limit gets its batch size's split count (the kernel cuts
    # each sequence's shares from its own length, at least min_seg positions each)
    assert plan(1, 1, 1, 131072)["num_splits"] == 32 and plan(1, 1, 1, 131072)["min_seg"] == 128
    # B=8 at 4k: 64 programs -> 5 splits for ~2 per SM, rounded down to 4
    assert plan(8, 8, 1, 4096)["num_splits"] == 4
    # B=1 at 4k: 32 splits of 128 positions; B=2: 16
    assert plan(1, 1, 1, 4096)["num_splits"] == 32
    assert plan(2, 2, 1, 4096)["num_splits"] == 16
    # from 1.5 programs per SM on (B=25 at 8 KV heads), one pass at every length (the fastest of 1-4
    # forced splits at B=32 and B=64-128 on the H200)
    assert plan(25, 25, 1, 131072)["num_splits"] == plan(64, 64, 1, 4096)["num_splits"] == 1
    assert plan(112, 112, 1, 131072)["num_splits"] == plan(256, 256, 1, 131072)["num_splits"] == 1
    assert plan(24, 24, 1, 4096)["num_splits"] == 2
    # the latency-bound decode batches load their first tile before the length; busier ones do not
    # (the early tile costs registers, so resident programs)
    assert plan(8, 8, 1, 4096)["strided"] and plan(24, 24, 1, 4096)["strided"]
    assert not plan(32, 32, 1, 4096)["strided"] and not plan(2000, 1, 2000, 2000)["strided"]
    # short context: no more splits than 128-position tiles, rounded up to a power of 2 (one tile a
    # split: a split of two waits on both)
    assert plan(1, 1, 1, 512)["num_splits"] == 4
    assert plan(1, 1, 1, 600)["num_splits"] == plan(1, 1, 1, 1024)["num_splits"] == 8
    assert plan(1, 1, 1, 100)["num_splits"] == 1
    # prefill never splits by heuristic
    assert plan(2000, 1, 2000, 2000)["num_splits"] == 1
    # decode tiles pack a token's QPK heads into 16 rows; prefill takes PREFILL_TILES
    assert (plan(64, 64, 1, 4096)["block_m"], plan(64, 64, 1, 4096)["block_q"]) == (16, 4)
    bm, tn, warps, stages = PREFILL_TILES[128]
    p = plan(4096, 1, 4096, 4096)
    assert (p["block_m"], p["block_q"], p["tile_n"], p["num_warps"]) == (bm, bm // 4, tn, warps)
    assert not p["decode"] and p["grid0"] == 4096 // (bm // 4) + 1 and p["k_rows"]
    # launches of a mixed-step graph's size take the short-prefill tiles (two programs per SM)
    bm, tn, warps, stages = SHORT_PREFILL_TILES[128]
    p = plan(SHORT_PREFILL_TOKENS, 201, 512, 1024)
    assert (p["block_m"], p["tile_n"], p["num_warps"], p["num_stages"]) == (bm, tn, warps, stages) != PREFILL_TILES[128]
    # a forced split count cuts exact shares: no floor beyond one tile
    assert _plan(128, 4, 1, 1, 8, 1, 300, 2, num_sms=132, interpret=False)["min_seg"] == 128
    # a forced split count is clamped to the power of 2 at or above the tiles there are
    assert _plan(128, 4, 1, 1, 8, 1, 300, 50, num_sms=132, interpret=False)["num_splits"] == 4
    assert _plan(128, 4, 1, 1, 8, 1, 300, 3, num_sms=132, interpret=False)["num_splits"] == 3


@pytest.mark.parametrize("num_seqs", [1, 2, 4, 8, 16])
def test_latency_bound_decode_splits_take_one_tile_each_below_the_cap(num_seqs):
    """Every split of a latency-bound decode plan owns at most one 128-position tile of its longest
    sequence, unless the split count is at its cap (~2 programs per SM, a power of 2)."""
    def splits(max_seq_len):
        return _plan(128, 4, num_seqs, num_seqs, 8, 1, max_seq_len, None, 132, False)["num_splits"]
    cap = splits(1 << 20)
    for max_seq_len in range(1, 8193):
        n = splits(max_seq_len)
        assert n == cap or n >= math.ceil(max_seq_len / 128), (num_seqs, max_seq_len, n)
        assert n & (n - 1) == 0 and n <= max(1, 2 * math.ceil(max_seq_len / 128))


@pytest.mark.parametrize("num_seqs", [1, 2, 8, 16, 32, 64, 112, 256])
@pytest.mark.parametrize("fp8", [False, True])
def test_decode_graph_lengths_give_each_batch_its_own_plan(num_seqs, fp8):
    """The graph the runner replays for a decode batch (the shortest length >= its max_seq_len) has the
    plan the batch gets without a graph, at every length up to the limit (H200-sized, 8 KV heads)."""
    max_model_len = 8192
    lengths = _graph_lengths(num_seqs, 4, 8, 128, max_model_len, 132, False, fp8)
    assert lengths == sorted(set(lengths)) and lengths[-1] == max_model_len

    def plan(max_seq_len):
        return _plan(128, 4, num_seqs, num_seqs, 8, 1, max_seq_len, None, 132, False, fp8)

    graph_plans = {n: plan(n) for n in lengths}
    for max_seq_len in range(1, max_model_len + 1):
        graph_len = next(n for n in lengths if n >= max_seq_len)
        assert graph_plans[graph_len] == plan(max_seq_len), (num_seqs, max_seq_len, graph_len)
    assert len({str(p) for p in graph_plans.values()}) == len(lengths)  # no two graphs alike


def test_decode_graph_lengths_where_the_split_count_moves():
    # B=1: 2 per SM needs 33 splits (32), and a split takes one 128-position tile: one graph per doubling
    assert _graph_lengths(1, 4, 8, 128, 131072, 132, False, False) == [128, 256, 512, 1024, 2048, 131072]
    # B=64 and B=256 never split: the one graph at the limit; the interpreter plans one pass at every length
    assert _graph_lengths(64, 4, 8, 128, 131072, 132, False, False) == [131072]
    assert _graph_lengths(256, 4, 8, 128, 131072, 132, False, False) == [131072]
    assert _graph_lengths(1, 4, 8, 128, 4096, 1, True, False) == [4096]


def _valid_args():
    b = make_batch([(3, 2)], num_kv_heads=2, qpk=2, head_dim=64, block_size=BS, device=DEVICE)
    return b, list(b.args()) + [0.125]


@pytest.mark.parametrize("mutate,message", [
    (lambda a: a.__setitem__(0, a[0].half()), "k_cache: dtype float32 not supported; use float16"),
    (lambda a: a.__setitem__(0, a[0][:, :3]), "not a multiple of num_kv_heads"),
    (lambda a: a.__setitem__(0, a[0].transpose(0, 2).contiguous().transpose(0, 2)), "last dim must have stride 1"),
    (lambda a: a.__setitem__(3, a[3].long()), "block_tables: dtype int64 not supported"),
    (lambda a: a.__setitem__(4, a[4][:1]), "query_start_loc: expected shape [2]"),
    (lambda a: a.__setitem__(7, 10_000), "cannot hold max_seq_len=10000"),
    (lambda a: a.__setitem__(6, 0), "need 1 <= max_query_len"),
    (lambda a: a.__setitem__(2, a[2][:, :, :1]), "v_cache: expected shape"),
])
def test_launcher_rejects(mutate, message):
    _, args = _valid_args()
    mutate(args)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        paged_attention(*args)


def test_launcher_rejects_bad_window_and_out():
    b, args = _valid_args()
    with pytest.raises(ValueError, match="sliding_window=0"):
        paged_attention(*args, sliding_window=0)
    with pytest.raises(ValueError, match="scale=0.0: must be > 0"):
        paged_attention(*args[:-1], 0.0)
    with pytest.raises(ValueError, match="out: expected shape"):
        paged_attention(*args, out=b.query[:1].clone())


# ---- GPU, real sizes ---------------------------------------------------------------------------------

GPU_DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_gpu_mixed_head_dims(dtype, head_dim):
    seqs = [(0, 300), (1000, 1), (15, 1), (4000, 1), (517, 129), (0, 1), (2047, 1)]
    check(seqs, num_kv_heads=8, qpk=4, head_dim=head_dim, dtype=dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [None, 1, 16])
@pytest.mark.parametrize("ctx", [4095, 32767])
def test_gpu_long_decode(ctx, num_splits):
    check([(ctx, 1), (ctx // 3, 1), (17, 1)], num_kv_heads=8, qpk=4, head_dim=128, dtype=torch.bfloat16,
          num_splits=num_splits, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("qpk,num_kv_heads", [(1, 32), (4, 8), (8, 1)])
def test_gpu_long_prefill_chunk(qpk, num_kv_heads):
    # a 512-token chunk after a 31.7k cached prefix, plus decodes
    check([(32768 - 512, 512), (100, 1), (8000, 1)], num_kv_heads=num_kv_heads, qpk=qpk, head_dim=128,
          dtype=torch.bfloat16, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("window", [256, 4096])
@pytest.mark.parametrize("num_splits", [None, 8])
def test_gpu_sliding_window(window, num_splits):
    check([(9000, 1), (6000, 200), (100, 1)], num_kv_heads=8, qpk=4, head_dim=128, dtype=torch.bfloat16,
          window=window, num_splits=num_splits, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [16, 32, 128])
def test_gpu_fp32_block_sizes(block_size):
    check([(3000, 1), (700, 300), (block_size - 1, 1)], num_kv_heads=4, qpk=2, head_dim=64, block_size=block_size,
          dtype=torch.float32, device="cuda")


@pytest.mark.gpu
def test_gpu_split_merge_graph_replays():
    # A split decode as the engine's graphs run it (8 splits from the batch size, cut on the device
    # from each sequence's length, the merge launch inside the graph): replayed with new queries, every replay matches the reference.
    b = make_batch([(4000, 1), (130, 1), (2047, 1), (9000, 1)], num_kv_heads=8, qpk=4, head_dim=128,
                   block_size=16, dtype=torch.bfloat16, device="cuda")
    query = b.query.clone()
    out = torch.empty_like(query)
    # planned as the engine's graphs are: max_seq_len the table's width, not the batch's longest
    args = (query,) + b.args()[1:6] + (1, b.block_tables.shape[1] * 16, 128 ** -0.5)

    def step():
        paged_attention(*args, out=out)

    step()  # eager first: compiles outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    gen = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(40):
        query.copy_(torch.randn(query.shape, generator=gen, device="cuda", dtype=query.dtype))
        graph.replay()
        ref = paged_attention_reference(query, *b.args()[1:], 128 ** -0.5)
        assert_close(out, ref, torch.bfloat16)
