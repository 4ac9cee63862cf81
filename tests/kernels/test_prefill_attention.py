"""paged_attention given this step's key/value: prefill chunks through kernels/prefill_attention.py
(cached prefix from the block table, the chunk's own K/V through TMA descriptors), against
paged_attention_reference. CPU (interpreter, small tiles: many tiles a sequence, BLOCK_N < BLOCK_M)
and GPU (real sizes)."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import DEVICE, assert_close, make_batch

import kernels.paged_attention as pa
from kernels.kv_cache import quantize_fp8
from kernels.paged_attention import paged_attention, paged_attention_reference
from kernels.prefill_attention import EAGER_MIN_TOKENS, gpu_takes

BS = 16


def _spy_launches(monkeypatch, keyword: str, default) -> list:
    """One entry per launch through prefill_attention: the value it got for `keyword`."""
    calls = []
    real = pa.prefill_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get(keyword, default))
        return real(*args, **kwargs)

    monkeypatch.setattr(pa, "prefill_attention", spy)
    return calls


@pytest.fixture
def prefill_calls(monkeypatch):
    """How many launches went through prefill_attention (the path under test, not the fallback)."""
    return _spy_launches(monkeypatch, "skip_single", None)


@pytest.fixture
def prefix_loops(monkeypatch):
    """has_prefix of each prefill_attention launch."""
    return _spy_launches(monkeypatch, "has_prefix", True)


def run(seqs, *, num_kv_heads=2, qpk=2, head_dim=64, block_size=BS, dtype=torch.float32, window=None,
        index_singles=False, pad_tokens=0, device=DEVICE, min_query_len=1, max_prefix_len=None):
    b = make_batch(seqs, num_kv_heads=num_kv_heads, qpk=qpk, head_dim=head_dim, block_size=block_size,
                   dtype=dtype, device=device)
    query, key, value = b.query, b.key, b.value
    if pad_tokens:  # a CUDA graph's padded rows: part of the tensors, of no sequence
        heads = query.shape[1] + 2 * num_kv_heads
        qkv = torch.full((query.shape[0] + pad_tokens, heads * head_dim), 7.0, dtype=dtype, device=device)
        qkv[: query.shape[0]] = torch.cat([query.flatten(1), key.flatten(1), value.flatten(1)], 1)
        h, hk = query.shape[1] * head_dim, num_kv_heads * head_dim
        query = qkv[:, :h].view(-1, query.shape[1], head_dim)
        key = qkv[:, h: h + hk].view(-1, num_kv_heads, head_dim)
        value = qkv[:, h + hk:].view(-1, num_kv_heads, head_dim)
    singles = None
    if index_singles:
        q_lens = (b.query_start_loc[1:] - b.query_start_loc[:-1]).cpu()
        singles = torch.nonzero(q_lens == 1).flatten().to(torch.int32).to(device)
    out = torch.full_like(query, float("nan"), memory_format=torch.contiguous_format)
    args = (query, b.k_cache, b.v_cache, b.block_tables, b.query_start_loc, b.seq_lens, b.max_query_len, b.max_seq_len)
    paged_attention(*args, head_dim ** -0.5, window, out=out, decode_seq_index=singles, key=key, value=value,
                    min_query_len=min_query_len, max_prefix_len=max_prefix_len)
    n = int(b.query_start_loc[-1])
    ref = paged_attention_reference(*args, head_dim ** -0.5, window)
    assert_close(out[:n], ref[:n], dtype)
    assert out[n:].isnan().all(), "rows of no sequence were written"
    return out


# fresh prompts, chunks after a cached prefix (not a block or tile multiple), decode rows, lengths
# around the interpreter's tiles (BLOCK_M 32, BLOCK_N 16)
MIXED = [(0, 19), (BS - 1, 1), (21, 9), (0, 1), (BS + 1, 1), (2 * BS, BS), (5, 40), (0, 32), (47, 33), (0, 65)]


@pytest.mark.parametrize("qpk,num_kv_heads", [(1, 3), (2, 2), (4, 1)])
def test_mixed_batch_through_the_contiguous_path(prefill_calls, qpk, num_kv_heads):
    run(MIXED, qpk=qpk, num_kv_heads=num_kv_heads)
    assert prefill_calls == [False]


@pytest.mark.parametrize("pad_tokens", [0, 37])
def test_decode_rows_indexed_beside_prefill_chunks(prefill_calls, pad_tokens):
    # the decode launch does the one-token sequences; the prefill launch must leave them alone
    run([(BS + 1, 1)] + MIXED + [(40, 1), (0, 1)], qpk=4, num_kv_heads=1, index_singles=True,
        pad_tokens=pad_tokens)
    assert prefill_calls == [True]


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_head_dims_and_dtypes(prefill_calls, head_dim, dtype):
    run([(3, 50), (BS + 1, 1), (0, 33)], head_dim=head_dim, dtype=dtype, num_kv_heads=1)
    assert prefill_calls == [False]


@pytest.mark.parametrize("block_size", [8, 64])
def test_block_sizes(prefill_calls, block_size):
    run([(block_size - 1, 40), (block_size + 1, 3), (0, block_size + 2), (3 * block_size, 17)], block_size=block_size)
    assert len(prefill_calls) == 1


def test_long_prefix_short_chunk(prefill_calls):
    # many prefix tiles and a chunk shorter than one q-block; heaviest q-block first in the grid
    run([(200, 5), (0, 100), (131, 64)])
    assert len(prefill_calls) == 1


def test_sliding_window_and_fp8_keep_the_block_table_kernel(prefill_calls):
    run(MIXED, window=5)
    b = make_batch([(5, 40), (0, 20)], num_kv_heads=2, qpk=2, head_dim=64, block_size=BS, device=DEVICE)
    k8, v8 = quantize_fp8(b.k_cache, 0.5), quantize_fp8(b.v_cache, 0.5)
    args = (b.query, k8, v8, b.block_tables, b.query_start_loc, b.seq_lens, b.max_query_len, b.max_seq_len)
    out = paged_attention(*args, 0.125, k_scale=0.5, v_scale=0.5, key=b.key, value=b.value)
    ref = paged_attention_reference(*args, 0.125, k_scale=0.5, v_scale=0.5)
    assert (out - ref).abs().max() < 1e-4
    assert prefill_calls == []


def test_which_launches_the_gpu_gives_this_path():
    # a chunk of over 2k tokens; or over 1k tokens of chunks only (the engine runs those eagerly): no
    # decode row, whose head slots would each read its whole context
    assert gpu_takes(2049, 2049, 1) and gpu_takes(4096, 512, 512)
    assert gpu_takes(2048, 2048, 2048) and gpu_takes(1025, 512, 513)
    assert not gpu_takes(4096, 512, 1)  # a decode row, or not known
    assert not gpu_takes(1024, 512, 512)  # short: the engine's mixed-step graph, with the block-table kernel
    assert not gpu_takes(2048, 2048, 1)


def test_the_engine_runs_these_launches_eagerly():
    """The chunks-only launches this path takes are the ones the runner does not replay as a mixed-step
    graph (whose padded rows have no chunk): one rule."""
    from engine_svc.attention.triton_backend import TritonAttentionBackend
    backend = TritonAttentionBackend()
    assert backend.runs_eagerly(EAGER_MIN_TOKENS, [EAGER_MIN_TOKENS // 2, EAGER_MIN_TOKENS - EAGER_MIN_TOKENS // 2])
    assert backend.runs_eagerly(2048, [2048])
    assert not backend.runs_eagerly(EAGER_MIN_TOKENS - 1, [EAGER_MIN_TOKENS - 1])  # short: the graph
    assert not backend.runs_eagerly(2048, [2047, 1])  # a decode row
    for tokens, lens in [(EAGER_MIN_TOKENS, [512, 513]), (2048, [2047, 1]), (1024, [1024])]:
        assert backend.runs_eagerly(tokens, lens) == gpu_takes(tokens, max(lens), min(lens))


@pytest.mark.parametrize("num_kv_heads,qpk", [(2, 2), (1, 4)])
def test_fresh_prompts_drop_the_prefix_loop(prefix_loops, num_kv_heads, qpk):
    # the engine says 0 when no sequence has a cached prefix (fresh prompts: seq_len == query length)
    fresh = [(0, 19), (0, 1), (0, 40), (0, 65), (0, 32)]
    run(fresh, num_kv_heads=num_kv_heads, qpk=qpk, max_prefix_len=0)
    run(fresh, num_kv_heads=num_kv_heads, qpk=qpk)  # unknown: the loop stays
    run([(0, 40), (21, 33)], num_kv_heads=num_kv_heads, qpk=qpk, max_prefix_len=21)
    assert prefix_loops == [False, True, True]


def test_prefill_tiles_need_block_n_to_divide_block_m():
    b = make_batch([(0, 200)], num_kv_heads=1, qpk=2, head_dim=64, block_size=BS, device=DEVICE)
    out = torch.empty_like(b.query)
    with pytest.raises(ValueError, match="BLOCK_N must divide BLOCK_M"):
        pa.prefill_attention(b.query, b.key, b.value, b.k_cache, b.v_cache, b.block_tables, b.query_start_loc,
                             b.seq_lens, b.max_query_len, 0.125, out, tiles=(32, 64, 4, 1))


def test_decode_batches_ignore_key_and_value(prefill_calls):
    run([(30, 1), (5, 1)])
    assert prefill_calls == []


@pytest.mark.parametrize("mutate,message", [
    (lambda kv: (kv[0], None), "value: missing"),
    (lambda kv: (kv[0][:-1], kv[1]), "key: expected shape"),
    (lambda kv: (kv[0].half(), kv[1]), "key: dtype float16 not supported"),
])
def test_bad_key_value_is_rejected(mutate, message):
    b = make_batch([(5, 40)], num_kv_heads=2, qpk=2, head_dim=64, block_size=BS, device=DEVICE)
    key, value = mutate((b.key, b.value))
    with pytest.raises(ValueError, match=message):
        paged_attention(*b.args(), 0.125, key=key, value=value)


# ---- GPU, real sizes ---------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_prefill_chunks(prefill_calls, dtype, head_dim):
    seqs = [(0, 3000), (1000, 1), (517, 129), (0, 1), (30000, 700), (2047, 1), (16, 2100), (0, 63)]
    run(seqs, num_kv_heads=8, qpk=4, head_dim=head_dim, dtype=dtype, index_singles=True, pad_tokens=100,
        device="cuda")
    assert prefill_calls == [True]


@pytest.mark.gpu
def test_gpu_long_prompt_takes_the_path_and_graph_sized_chunks_do_not(prefill_calls):
    # chunks of at most 2k tokens beside a decode row stay on the block-table kernel in the engine
    # (ENGINE_MIN_CHUNK_TOKENS)
    run([(0, 8192)], num_kv_heads=8, qpk=4, head_dim=128, dtype=torch.bfloat16, device="cuda")
    run([(0, 2048), (100, 2000)], num_kv_heads=8, qpk=4, head_dim=128, dtype=torch.bfloat16, device="cuda")
    assert prefill_calls == [False]
    # ... unless the launch is EAGER_MIN_TOKENS or more of chunks only (an eager step; the runner says so)
    run([(0, 2048), (100, 2000)], num_kv_heads=8, qpk=4, head_dim=128, dtype=torch.bfloat16, device="cuda",
        min_query_len=2000)
    half = (EAGER_MIN_TOKENS - 1) // 2  # one token short of it: a mixed-step graph's launch
    run([(0, half), (100, EAGER_MIN_TOKENS - 1 - half)], num_kv_heads=8, qpk=4, head_dim=128,
        dtype=torch.bfloat16, device="cuda", min_query_len=half)
    assert prefill_calls == [False, False]


@pytest.mark.gpu
def test_gpu_eager_batch_of_short_prompts(prefill_calls):
    # a burst of 512-token prompts (8192 tokens, an eager step), one after a cached prefix
    seqs = [(0, 512)] * 15 + [(700, 512)]
    run(seqs, num_kv_heads=8, qpk=4, head_dim=128, dtype=torch.bfloat16, device="cuda", min_query_len=512)
    assert prefill_calls == [False]


@pytest.mark.gpu
@pytest.mark.parametrize("tiles", [(64, 64, 4, 3), (128, 128, 8, 3)])
def test_gpu_both_tile_classes(tiles):
    # the short-chunk tiles are bench/prefill_probe.py's; both must stay correct at real sizes
    b = make_batch([(0, 2048), (100, 2000), (517, 129), (0, 1)], num_kv_heads=8, qpk=4, head_dim=128,
                   block_size=BS, dtype=torch.bfloat16, device="cuda")
    out = torch.full_like(b.query, float("nan"), memory_format=torch.contiguous_format)
    pa.prefill_attention(b.query, b.key, b.value, b.k_cache, b.v_cache, b.block_tables, b.query_start_loc,
                         b.seq_lens, b.max_query_len, 128 ** -0.5, out, tiles=tiles)
    assert_close(out, paged_attention_reference(*b.args(), 128 ** -0.5), torch.bfloat16)


@pytest.mark.parametrize("variant", [{"STATIC_DIAG": True}, {"TMA_STORE": True},
                                     {"STATIC_DIAG": True, "TMA_STORE": True}, {"PREFIX": False},
                                     {"HEADS_INNER": False}])  # the other grid order
def test_kernel_variants(variant):
    # the tuning switches of bench/prefill_probe.py; PREFIX False only for chunks without a cached prefix
    seqs = [(0, 70), (0, 5), (0, 32), (0, 33)] if variant.get("PREFIX") is False else MIXED
    b = make_batch(seqs, num_kv_heads=2, qpk=2, head_dim=64, block_size=BS, device=DEVICE)
    out = torch.full_like(b.query, float("nan"), memory_format=torch.contiguous_format)
    pa.prefill_attention(b.query, b.key, b.value, b.k_cache, b.v_cache, b.block_tables, b.query_start_loc,
                         b.seq_lens, b.max_query_len, 0.125, out, variant=variant)
    assert_close(out, paged_attention_reference(*b.args(), 0.125), torch.float32)


def test_more_sequences_than_one_locate_pass(prefill_calls):
    # _locate reads 256 sequences a pass: blocks of sequences 256+ come from the second pass
    seqs = [(i % 20, 2 + i % 3) for i in range(255)] + [(5, 70), (0, 1), (3, 40)]
    run(seqs, num_kv_heads=1, qpk=1)
    assert prefill_calls == [False]
