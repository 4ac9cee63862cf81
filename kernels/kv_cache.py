"""Write new K/V into the paged cache through a slot mapping.

Cache layout (engine_svc/attention/base.py): ``[num_blocks, block_size, num_kv_heads, head_dim]``;
token i goes to slot ``slot_mapping[i] = block_id * block_size + offset``; slot -1 means skip.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._checks import FLOAT_DTYPES, check_shape, check_tensor, next_pow2


@triton.jit
def _write_kv_cache_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim], any token/head strides, head_dim stride 1
    value_ptr,  # [num_tokens, num_kv_heads, head_dim], same
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], head_dim stride 1
    v_cache_ptr,  # same shape as k_cache
    slot_mapping_ptr,  # [num_tokens] int32/int64, -1 = skip
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_kcb, stride_kct, stride_kch,
    stride_vcb, stride_vct, stride_vch,
    NUM_KV_HEADS: tl.constexpr,  # heads per token; rows of the tile
    HEAD_DIM: tl.constexpr,  # true head size (masks the padded columns)
    HEADS_PAD: tl.constexpr,  # NUM_KV_HEADS rounded up to a power of 2 (tl.arange needs one)
    HEAD_DIM_PAD: tl.constexpr,  # HEAD_DIM rounded up to a power of 2
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block; a constexpr so // and % are shifts
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
    tl.store(k_cache_ptr + blk * stride_kcb + off * stride_kct + h * stride_kch + d, k, mask=mask)
    tl.store(v_cache_ptr + blk * stride_vcb + off * stride_vct + h * stride_vch + d, v, mask=mask)


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Copy ``key[i]``/``value[i]`` into the caches at ``slot_mapping[i]`` (in place; -1 skips).

    Args:
        key, value: ``[num_tokens, num_kv_heads, head_dim]``, the cache's dtype; token and head
            strides are free (views of a fused qkv output are fine), head_dim must have stride 1.
        k_cache, v_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``, head_dim stride 1.
        slot_mapping: int32 or int64 ``[num_tokens]``, contiguous; every slot must be -1 or below
            ``num_blocks * block_size`` (not checked on the device: that would need a sync).

    Raises:
        ValueError: on a dtype, shape, stride or device mismatch.

    Grid: one program per token, writing all of its heads ([heads, head_dim] tile) to both caches.
    """
    dev = k_cache.device
    check_tensor("k_cache", k_cache, ndim=4, dtypes=FLOAT_DTYPES, device=dev)
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    check_tensor("v_cache", v_cache, ndim=4, dtypes=(k_cache.dtype,), device=dev)
    check_shape("v_cache", v_cache, tuple(k_cache.shape))
    check_tensor("key", key, ndim=3, dtypes=(k_cache.dtype,), device=dev)
    num_tokens = key.shape[0]
    check_shape("key", key, (num_tokens, num_kv_heads, head_dim))
    check_tensor("value", value, ndim=3, dtypes=(k_cache.dtype,), device=dev)
    check_shape("value", value, (num_tokens, num_kv_heads, head_dim))
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=(torch.int32, torch.int64), contiguous=True,
                 device=dev)
    check_shape("slot_mapping", slot_mapping, (num_tokens,))
    if num_tokens == 0:
        return
    _write_kv_cache_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        HEADS_PAD=next_pow2(num_kv_heads), HEAD_DIM_PAD=next_pow2(head_dim), BLOCK_SIZE=block_size,
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1,
    )


def write_kv_cache_reference(key, value, k_cache, v_cache, slot_mapping) -> None:
    """Plain-PyTorch ``write_kv_cache``: same arguments, same in-place effect."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    block_size = k_cache.shape[1]
    blk, off = slots // block_size, slots % block_size
    k_cache[blk, off] = key[keep]
    v_cache[blk, off] = value[keep]
