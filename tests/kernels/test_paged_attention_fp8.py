"""paged_attention over float8_e4m3fn caches against the reference over the same (dequantised) cache."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import DEVICE, assert_close, make_batch

from kernels.kv_cache import quantize_fp8
from kernels.paged_attention import paged_attention, paged_attention_reference

BS = 16


def _scales(kind, num_kv_heads, device):
    if kind == "tensor":
        return 0.05, 0.02
    gen = torch.Generator().manual_seed(3)
    return ((torch.rand(num_kv_heads, generator=gen) * 0.1 + 0.01).to(device),
            (torch.rand(num_kv_heads, generator=gen) * 0.1 + 0.01).to(device))


def check_fp8(seqs, *, scales="tensor", num_kv_heads=2, qpk=2, head_dim=64, dtype=torch.float32, window=None,
              num_splits=None, device=DEVICE):
    b = make_batch(seqs, num_kv_heads=num_kv_heads, qpk=qpk, head_dim=head_dim, block_size=BS, dtype=dtype,
                   device=device)
    k_scale, v_scale = _scales(scales, num_kv_heads, device)
    # quantised as the write kernel does; unowned slots stay NaN (e4m3fn keeps NaN)
    k_cache, v_cache = quantize_fp8(b.k_cache, k_scale), quantize_fp8(b.v_cache, v_scale)
    assert k_cache.float().isnan().any()
    args = (b.query, k_cache, v_cache, b.block_tables, b.query_start_loc, b.seq_lens, b.max_query_len,
            b.max_seq_len, head_dim ** -0.5, window)
    out = torch.full_like(b.query, float("nan"), memory_format=torch.contiguous_format)
    paged_attention(*args, out=out, k_scale=k_scale, v_scale=v_scale, num_splits=num_splits)
    ref = paged_attention_reference(*args, k_scale=k_scale, v_scale=v_scale)
    assert_close(out, ref, dtype)
    # and the quantisation error itself stays small against the unquantised cache
    exact = paged_attention_reference(*b.args(), head_dim ** -0.5, window)
    err = ((out.double() - exact.double()).norm() / exact.double().norm()).item()
    assert err < 0.1, f"fp8 cache error {err:.3f} against the unquantised cache"


MIXED = [(0, 19), (BS - 1, 1), (21, 9), (0, 1), (BS + 1, 1), (2 * BS, BS), (5, 40)]


@pytest.mark.parametrize("scales", ["tensor", "head"])
@pytest.mark.parametrize("qpk,num_kv_heads", [(1, 3), (4, 2)])
def test_fp8_mixed(scales, qpk, num_kv_heads):
    check_fp8(MIXED, scales=scales, qpk=qpk, num_kv_heads=num_kv_heads)


@pytest.mark.parametrize("num_splits,window", [(3, None), (64, None), (4, 7)])
def test_fp8_decode_split(num_splits, window):
    check_fp8([(90, 1), (0, 1), (BS, 1), (200, 1)], scales="head", num_splits=num_splits, window=window,
              qpk=4, num_kv_heads=2)


def test_fp8_half_queries():
    check_fp8([(20, 1), (5, 7)], dtype=torch.float16)


def test_fp8_rejects_mixed_cache_dtypes():
    b = make_batch([(3, 2)], num_kv_heads=2, qpk=2, head_dim=64, block_size=BS, device=DEVICE)
    k8 = b.k_cache.to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="v_cache: dtype float32 not supported; use float8_e4m3fn"):
        paged_attention(b.query, k8, b.v_cache, *b.args()[3:], 0.125)
    with pytest.raises(ValueError, match="k_scale: expected float32 with 1 or 2 values"):
        paged_attention(b.query, k8, k8, *b.args()[3:], 0.125, k_scale=torch.ones(5, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("scales", ["tensor", "head"])
@pytest.mark.parametrize("num_splits", [None, 1])
def test_gpu_fp8_real_sizes(scales, num_splits):
    seqs = [(0, 700), (4000, 1), (15, 1), (2047, 1), (517, 129), (9000, 1)]
    check_fp8(seqs, scales=scales, num_kv_heads=8, qpk=4, head_dim=128, dtype=torch.bfloat16,
              num_splits=num_splits, device="cuda")


@pytest.mark.gpu
def test_gpu_fp8_small_batch_decode():
    check_fp8([(8191, 1)], scales="head", num_kv_heads=8, qpk=4, head_dim=128, dtype=torch.bfloat16,
              device="cuda")
