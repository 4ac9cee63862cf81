"""write_kv_cache against write_kv_cache_reference."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import DEVICE

from kernels.kv_cache import write_kv_cache, write_kv_cache_reference


def _case(num_tokens, num_kv_heads, head_dim, block_size, num_blocks, dtype, device, slot_dtype=torch.int64):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    qkv = torch.randn(num_tokens, (2 + 2 * num_kv_heads) * head_dim, generator=gen).to(device, dtype)
    # key/value as strided views of a fused projection output, like the model produces them
    key = qkv[:, 2 * head_dim: (2 + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    value = qkv[:, (2 + num_kv_heads) * head_dim:].view(num_tokens, num_kv_heads, head_dim)
    perm = torch.randperm(num_blocks * block_size, generator=gen)
    last = int((perm == num_blocks * block_size - 1).nonzero())
    perm[[0, last]] = perm[[last, 0]]  # token 0 writes the cache's very last slot
    slots = perm[:num_tokens]
    skip = torch.rand(num_tokens, generator=gen) < 0.25
    skip[0] = False
    slots[skip] = -1  # padding tokens
    cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype, device=device)
    return key, value, cache, slots.to(device=device, dtype=slot_dtype)


@pytest.mark.parametrize("num_kv_heads,head_dim,block_size", [(1, 64, 16), (3, 80, 8), (8, 128, 16), (2, 256, 32)])
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_write_matches_reference(num_kv_heads, head_dim, block_size, slot_dtype):
    key, value, cache, slots = _case(37, num_kv_heads, head_dim, block_size, 7, torch.float32, DEVICE, slot_dtype)
    kc, vc = cache.clone(), cache.clone()
    kr, vr = cache.clone(), cache.clone()
    write_kv_cache(key, value, kc, vc, slots)
    write_kv_cache_reference(key, value, kr, vr, slots)
    # NaN == NaN here: untouched slots must stay poisoned, written ones must match exactly
    assert torch.equal(kc.nan_to_num(7.0), kr.nan_to_num(7.0))
    assert torch.equal(vc.nan_to_num(7.0), vr.nan_to_num(7.0))
    written = (slots >= 0).sum().item()
    assert (~kc.isnan()).sum().item() == written * num_kv_heads * head_dim


def test_rejects_bad_arguments():
    key, value, cache, slots = _case(4, 2, 64, 16, 2, torch.float32, DEVICE)
    with pytest.raises(ValueError, match="key: dtype float16 not supported; use float32"):
        write_kv_cache(key.half(), value, cache, cache.clone(), slots)
    with pytest.raises(ValueError, match=r"value: expected shape \[4, 2, 64\]"):
        write_kv_cache(key, value[:, :1], cache, cache.clone(), slots)
    with pytest.raises(ValueError, match="slot_mapping: dtype float32"):
        write_kv_cache(key, value, cache, cache.clone(), slots.float())
    with pytest.raises(ValueError, match="k_cache: the last dim must have stride 1"):
        write_kv_cache(key, value, cache.transpose(2, 3), cache.clone(), slots)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens", [1, 4096])
def test_gpu_write(dtype, num_tokens):
    key, value, cache, slots = _case(num_tokens, 8, 128, 16, 1024, dtype, "cuda")
    kc, vc, kr, vr = cache.clone(), cache.clone(), cache.clone(), cache.clone()
    write_kv_cache(key, value, kc, vc, slots)
    write_kv_cache_reference(key, value, kr, vr, slots)
    assert torch.equal(kc.nan_to_num(7.0), kr.nan_to_num(7.0))
    assert torch.equal(vc.nan_to_num(7.0), vr.nan_to_num(7.0))


# ---- FP8 (e4m3) caches: the write quantises exactly as the reference does -----------------------------

def _fp8_scales(kind, num_kv_heads, device):
    if kind == "tensor":
        return 0.37, 2.5
    gen = torch.Generator().manual_seed(7)
    k = (torch.rand(num_kv_heads, generator=gen) + 0.1).to(device)
    v = (torch.rand(num_kv_heads, generator=gen) * 3 + 0.1).to(device)
    return k, v


def _assert_same_bytes(got, want, src_k, slots):
    g, w = got.view(torch.uint8), want.view(torch.uint8)
    bad = (g != w).nonzero()
    if len(bad):
        i = tuple(bad[0].tolist())
        tok = int((slots == i[0] * got.shape[1] + i[1]).nonzero()[0])
        raise AssertionError(f"{len(bad)} bytes differ; first at {i}: source {src_k[tok, i[2], i[3]].item()!r}, "
                             f"kernel {got[i].float().item()} (0x{int(g[i]):02x}), "
                             f"reference {want[i].float().item()} (0x{int(w[i]):02x})")


@pytest.mark.parametrize("scales", ["tensor", "head"])
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.float16])
def test_write_fp8_matches_reference(scales, src_dtype):
    key, value, cache, slots = _case(29, 3, 64, 16, 5, src_dtype, DEVICE)
    key = key * 300  # some values beyond e4m3's 448 after scaling: they must saturate, not turn NaN
    fp8 = cache.to(torch.float8_e4m3fn)  # NaN poison survives the cast
    k_scale, v_scale = _fp8_scales(scales, 3, DEVICE)
    kc, vc, kr, vr = fp8.clone(), fp8.clone(), fp8.clone(), fp8.clone()
    write_kv_cache(key, value, kc, vc, slots, k_scale, v_scale)
    write_kv_cache_reference(key, value, kr, vr, slots, k_scale, v_scale)
    _assert_same_bytes(kc, kr, key, slots)
    _assert_same_bytes(vc, vr, value, slots)
    written = (slots >= 0).sum().item() * 3 * 64
    assert (~kc.float().isnan()).sum().item() == written
    assert kc.float().nan_to_num(0.0).abs().max().item() == 448.0  # saturated


def test_write_fp8_rejects_bad_scales():
    key, value, cache, slots = _case(4, 2, 64, 16, 2, torch.float32, DEVICE)
    fp8 = cache.to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="k_scale=0.0: must be > 0"):
        write_kv_cache(key, value, fp8, fp8.clone(), slots, 0.0, 1.0)
    with pytest.raises(ValueError, match="v_scale: expected float32 with 1 or 2 values"):
        write_kv_cache(key, value, fp8, fp8.clone(), slots, 1.0, torch.ones(3, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("scales", ["tensor", "head"])
def test_gpu_write_fp8(scales):
    key, value, cache, slots = _case(4096, 8, 128, 16, 1024, torch.bfloat16, "cuda")
    fp8 = cache.to(torch.float8_e4m3fn)
    k_scale, v_scale = _fp8_scales(scales, 8, "cuda")
    kc, vc, kr, vr = fp8.clone(), fp8.clone(), fp8.clone(), fp8.clone()
    write_kv_cache(key, value, kc, vc, slots, k_scale, v_scale)
    write_kv_cache_reference(key, value, kr, vr, slots, k_scale, v_scale)
    _assert_same_bytes(kc, kr, key, slots)
    _assert_same_bytes(vc, vr, value, slots)
