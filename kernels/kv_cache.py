"""Write new K/V into the paged cache through a slot mapping.

Cache layout (engine_svc/attention/base.py): ``[num_blocks, block_size, num_kv_heads, head_dim]``;
token i goes to slot ``slot_mapping[i] = block_id * block_size + offset``; slot -1 means skip.

An float8_e4m3fn cache stores ``x / scale`` rounded to nearest and saturated to +-448 (e4m3's largest
finite value: without saturation an outlier would become NaN), with one scale per tensor or per KV head.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._checks import FLOAT_DTYPES, FP8_DTYPES, check_shape, check_tensor, kv_scale_tensor, next_pow2


@triton.jit
def _round_e4m3(x):
    """fp32 x rounded to the nearest e4m3 value (ties to even), saturated to +-448; still fp32.

    The e4m3 quantum is 2^(exponent - 3), 2^-9 below the normal range; x / quantum < 16 is rounded to
    an integer through int32 (ties to even by hand: no float trick a compiler could reassociate away),
    so the following cast is exact. The hardware cast gives the same; Triton's interpreter, whose
    float8 rounding carries wrongly at binade edges (125.8 -> 64), then runs the CPU tests too.
    """
    a = tl.minimum(tl.abs(x), 448.0)
    e = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    quantum = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
    inv_quantum = ((127 - (e - 3)) << 23).to(tl.float32, bitcast=True)
    y = a * inv_quantum  # exact (a power of 2), in [0, 16)
    n = (y + 0.5).to(tl.int32)  # floor(y + 0.5): y + 0.5 is exact at these magnitudes
    n = tl.where((n.to(tl.float32) - y == 0.5) & ((n & 1) == 1), n - 1, n)  # a tie: to even
    r = n.to(tl.float32) * quantum
    # x's sign bit onto r by bits, not tl.where(x < 0, -r, r): compiled, that select lost the sign of
    # a negative x that rounds to zero (+0 where torch's cast gives -0; the H200's bit-exact test).
    sign = (x.to(tl.int32, bitcast=True) >> 31) << 31  # 0x80000000 for a negative x, else 0
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _write_kv_cache_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim], any token/head strides, head_dim stride 1
    value_ptr,  # [num_tokens, num_kv_heads, head_dim], same
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], head_dim stride 1
    v_cache_ptr,  # same shape as k_cache
    slot_mapping_ptr,  # [num_tokens] int32/int64, -1 = skip
    k_inv_scale_ptr, v_inv_scale_ptr,  # fp32 [num_kv_heads] 1 / quantisation scale; read only if CACHE_FP8
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_kcb, stride_kct, stride_kch,
    stride_vcb, stride_vct, stride_vch,
    NUM_KV_HEADS: tl.constexpr,  # heads per token; rows of the tile
    HEAD_DIM: tl.constexpr,  # true head size (masks the padded columns)
    HEADS_PAD: tl.constexpr,  # NUM_KV_HEADS rounded up to a power of 2 (tl.arange needs one)
    HEAD_DIM_PAD: tl.constexpr,  # HEAD_DIM rounded up to a power of 2
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block; a constexpr so // and % are shifts
    CACHE_FP8: tl.constexpr,  # quantise to e4m3 (x / scale, saturated)
):
    tok = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
    if slot < 0:
        return
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, HEAD_DIM_PAD)[None, :]
    mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
    t = tok.to(tl.int64)
    k = tl.load(key_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(value_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    if CACHE_FP8:
        head_ok = h < NUM_KV_HEADS
        # x * (1 / scale) with the reciprocal computed once by the launcher: the reference multiplies by
        # the same fp32 tensor, so both round identically on any device
        k = k.to(tl.float32) * tl.load(k_inv_scale_ptr + h, mask=head_ok, other=1.0)
        v = v.to(tl.float32) * tl.load(v_inv_scale_ptr + h, mask=head_ok, other=1.0)
        k = _round_e4m3(k).to(k_cache_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        v = _round_e4m3(v).to(v_cache_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
    tl.store(k_cache_ptr + blk * stride_kcb + off * stride_kct + h * stride_kch + d, k, mask=mask)
    tl.store(v_cache_ptr + blk * stride_vcb + off * stride_vct + h * stride_vch + d, v, mask=mask)


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, k_scale=1.0, v_scale=1.0) -> None:
    """Copy ``key[i]``/``value[i]`` into the caches at ``slot_mapping[i]`` (in place; -1 skips).

    Args:
        key, value: ``[num_tokens, num_kv_heads, head_dim]``, the cache's dtype (any float dtype for an
            FP8 cache); token and head strides are free (views of a fused qkv output are fine),
            head_dim must have stride 1.
        k_cache, v_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``, head_dim stride 1;
            float8_e4m3fn caches quantise (see the module doc).
        k_scale, v_scale: FP8 caches only: float (per tensor) or fp32 tensor of num_kv_heads values.
        slot_mapping: int32 or int64 ``[num_tokens]``, contiguous; every slot must be -1 or below
            ``num_blocks * block_size`` (not checked on the device: that would need a sync).

    Raises:
        ValueError: on a dtype, shape, stride or device mismatch.

    Grid: one program per token, writing all of its heads ([heads, head_dim] tile) to both caches.
    """
    dev = k_cache.device
    check_tensor("k_cache", k_cache, ndim=4, dtypes=FLOAT_DTYPES + FP8_DTYPES, device=dev)
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    check_tensor("v_cache", v_cache, ndim=4, dtypes=(k_cache.dtype,), device=dev)
    check_shape("v_cache", v_cache, tuple(k_cache.shape))
    cache_fp8 = k_cache.dtype in FP8_DTYPES
    key_dtypes = FLOAT_DTYPES if cache_fp8 else (k_cache.dtype,)
    check_tensor("key", key, ndim=3, dtypes=key_dtypes, device=dev)
    num_tokens = key.shape[0]
    check_shape("key", key, (num_tokens, num_kv_heads, head_dim))
    check_tensor("value", value, ndim=3, dtypes=(key.dtype,), device=dev)
    check_shape("value", value, (num_tokens, num_kv_heads, head_dim))
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=(torch.int32, torch.int64), contiguous=True,
                 device=dev)
    check_shape("slot_mapping", slot_mapping, (num_tokens,))
    k_inv = inverse_scales("k_scale", k_scale, num_kv_heads, dev) if cache_fp8 else slot_mapping
    v_inv = inverse_scales("v_scale", v_scale, num_kv_heads, dev) if cache_fp8 else slot_mapping
    if num_tokens == 0:
        return
    _write_kv_cache_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping, k_inv, v_inv,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        HEADS_PAD=next_pow2(num_kv_heads), HEAD_DIM_PAD=next_pow2(head_dim), BLOCK_SIZE=block_size,
        CACHE_FP8=cache_fp8,
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1,
    )


def write_kv_cache_reference(key, value, k_cache, v_cache, slot_mapping, k_scale=1.0, v_scale=1.0) -> None:
    """Plain-PyTorch ``write_kv_cache``: same arguments, same in-place effect."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    block_size = k_cache.shape[1]
    blk, off = slots // block_size, slots % block_size
    if k_cache.dtype in FP8_DTYPES:  # written through uint8 views: no CPU index_put for float8
        k_cache.view(torch.uint8)[blk, off] = quantize_fp8(key[keep], k_scale, k_cache.dtype).view(torch.uint8)
        v_cache.view(torch.uint8)[blk, off] = quantize_fp8(value[keep], v_scale, v_cache.dtype).view(torch.uint8)
        return
    k_cache[blk, off] = key[keep]
    v_cache[blk, off] = value[keep]


def quantize_fp8(x: torch.Tensor, scale, dtype=torch.float8_e4m3fn) -> torch.Tensor:
    """``x [..., num_kv_heads, head_dim] * (1 / scale)`` saturated to +-448 and rounded to e4m3 (scale:
    float or per KV head), bit for bit the write kernel's result."""
    inv = inverse_scales("scale", scale, x.shape[-2], x.device)
    return (x.float() * inv[:, None]).clamp(-448.0, 448.0).to(dtype)


def inverse_scales(name: str, scale, num_kv_heads: int, device) -> torch.Tensor:
    """fp32 ``[num_kv_heads]`` 1 / scale, the factor the write kernel and the reference both multiply by.
    A float's is cached (no launch, nothing allocated inside a CUDA graph); a tensor's is computed
    per call."""
    if isinstance(scale, torch.Tensor):
        return torch.reciprocal(kv_scale_tensor(name, scale, num_kv_heads, device))
    kv_scale_tensor(name, scale, num_kv_heads, device)  # validates
    return kv_scale_tensor(name, 1.0 / float(scale), num_kv_heads, device)
