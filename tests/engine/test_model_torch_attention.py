"""The CPU attention backend against naive per-query attention over contiguous K/V."""

from __future__ import annotations

import math
import random

import pytest
import torch

from engine_svc.attention.base import AttentionMetadata
from engine_svc.attention.selector import get_attention_backend
from engine_svc.attention.torch_backend import TorchAttentionBackend


def naive(q_all, k_all, v_all, ctx_lens, q_lens, scale, window):
    """Per sequence, per query token, per head: softmax over allowed keys (plain loops over tokens)."""
    outs, start = [], 0
    for s, (ctx, ql) in enumerate(zip(ctx_lens, q_lens)):
        k, v = k_all[s], v_all[s]  # [ctx + ql, KVH, D], the sequence's whole K/V
        g = q_all.shape[1] // k.shape[1]
        for j in range(ql):
            pos = ctx + j
            lo = 0 if window is None else max(0, pos - window + 1)
            q = q_all[start + j]  # [H, D]
            kk = k[lo:pos + 1].repeat_interleave(g, dim=1)  # [L, H, D]
            vv = v[lo:pos + 1].repeat_interleave(g, dim=1)
            w = torch.softmax(torch.einsum("hd,lhd->hl", q.double(), kk.double()) * scale, dim=-1)
            outs.append(torch.einsum("hl,lhd->hd", w, vv.double()))
        start += ql
    return torch.stack(outs).float()


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("kvh,g", [(2, 3), (4, 1)])
def test_torch_backend_matches_naive(block_size, window, kvh, g):
    rng = random.Random(block_size * 31 + (window or 0) + kvh)
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    D = 16
    # (context already cached, new query tokens): decodes, a fresh prefill, a chunk after context.
    shapes = [(0, 9), (17, 1), (40, 1), (5, 12), (0, 1), (33, 7)]
    num_blocks = 64
    free = list(range(1, num_blocks))
    rng.shuffle(free)
    k_cache = torch.randn(num_blocks, block_size, kvh, D, generator=gen)  # stale but finite data
    v_cache = torch.randn(num_blocks, block_size, kvh, D, generator=gen)
    tables, k_full, v_full, q_parts, new_k, new_v, slots = [], [], [], [], [], [], []
    for ctx, ql in shapes:
        n = ctx + ql
        blocks = [free.pop() for _ in range(-(-n // block_size))]
        tables.append(blocks)
        k = torch.randn(n, kvh, D, generator=gen)
        v = torch.randn(n, kvh, D, generator=gen)
        for p in range(ctx):  # the context is already in the cache
            k_cache[blocks[p // block_size], p % block_size] = k[p]
            v_cache[blocks[p // block_size], p % block_size] = v[p]
        k_full.append(k), v_full.append(v)
        new_k.append(k[ctx:]), new_v.append(v[ctx:])
        q_parts.append(torch.randn(ql, kvh * g, D, generator=gen))
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(ctx, n)]
    width = max(len(t) for t in tables)
    q_lens = [ql for _, ql in shapes]
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32),
        seq_lens=torch.tensor([c + q for c, q in shapes], dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        max_query_len=max(q_lens), max_seq_len=max(c + q for c, q in shapes), num_seqs=len(shapes))
    q = torch.cat(q_parts)
    scale = 1 / math.sqrt(D)
    out = TorchAttentionBackend().forward(q, torch.cat(new_k), torch.cat(new_v), k_cache, v_cache, meta,
                                          scale, window)
    ref = naive(q, k_full, v_full, [c for c, _ in shapes], q_lens, scale, window)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # The new tokens' K/V landed at their slots.
    flat_k = k_cache.view(-1, kvh, D)
    torch.testing.assert_close(flat_k[torch.tensor(slots)], torch.cat(new_k))


def test_padding_slots_are_not_written():
    k_cache = torch.zeros(4, 8, 1, 4)
    v_cache = torch.zeros(4, 8, 1, 4)
    meta = AttentionMetadata(torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([1, 1], dtype=torch.int32),
                             torch.tensor([[2], [0]], dtype=torch.int32), torch.tensor([16, -1]), 1, 1, 2)
    kv = torch.ones(2, 1, 4)
    TorchAttentionBackend().forward(torch.ones(2, 1, 4), kv, kv, k_cache, v_cache, meta, 0.5)
    assert k_cache[2, 0].sum() == 4 and k_cache.sum() == 4 and v_cache.sum() == 4


def test_selector(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # tests/kernels sets it process-wide
    assert get_attention_backend("cpu").name == "torch"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        get_attention_backend("cpu", "triton")
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        get_attention_backend("cpu", "flash")
