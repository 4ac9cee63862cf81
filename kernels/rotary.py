"""Rotary position embedding on q and k, in place, with transformers' rotate_half convention.

    out[..., :D/2] = x1 * cos - x2 * sin,   out[..., D/2:] = x2 * cos + x1 * sin

where x1, x2 are the two halves of each head. The cos/sin table is one tensor ``[max_positions, D]``
holding cos in its first half and sin in its second, as the model builds it; Llama 3 (or linear)
rope scaling only changes the inverse frequencies, so the caller passes the scaled ``inv_freq`` to
``build_cos_sin_cache`` (engine_svc/model/llama.py's ``rope_inv_freq`` computes it per rope_type).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._checks import FLOAT_DTYPES, check_shape, check_tensor, next_pow2


@triton.jit
def _rotate_heads(x_ptr, stride_h, c, s, NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
                  HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    """Rotate the [NUM_HEADS, 2 * HALF] rows at x_ptr in place (c, s: [1, HALF_PAD] fp32)."""
    h = tl.arange(0, HEADS_PAD)[:, None]
    j = tl.arange(0, HALF_PAD)[None, :]
    mask = (h < NUM_HEADS) & (j < HALF)
    p1 = x_ptr + h * stride_h + j
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * c - x2 * s).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(p1 + HALF, (x2 * c + x1 * s).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,  # [num_tokens, num_heads, head_dim], token/head strides free
    k_ptr,  # [num_tokens, num_kv_heads, head_dim], token/head strides free
    pos_ptr,  # [num_tokens] int32/int64
    cos_sin_ptr,  # [max_positions, head_dim]: cos | sin
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cs,
    NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,  # q heads, rounded up to a power of 2
    NUM_KV_HEADS: tl.constexpr, KV_HEADS_PAD: tl.constexpr,  # k heads, rounded up to a power of 2
    HALF: tl.constexpr, HALF_PAD: tl.constexpr,  # head_dim // 2, rounded up to a power of 2
):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    j = tl.arange(0, HALF_PAD)[None, :]
    c = tl.load(cos_sin_ptr + pos * stride_cs + j, mask=j < HALF, other=0.0).to(tl.float32)
    s = tl.load(cos_sin_ptr + pos * stride_cs + HALF + j, mask=j < HALF, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr + tok * stride_qt, stride_qh, c, s, NUM_HEADS, HEADS_PAD, HALF, HALF_PAD)
    _rotate_heads(k_ptr + tok * stride_kt, stride_kh, c, s, NUM_KV_HEADS, KV_HEADS_PAD, HALF, HALF_PAD)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor):
    """Rotate q and k in place by their tokens' positions; returns ``(q, k)``.

    Args:
        q: ``[num_tokens, num_heads, head_dim]``; k: ``[num_tokens, num_kv_heads, head_dim]``; same
            float dtype, token/head strides free (views of a fused qkv are fine), head_dim stride 1,
            head_dim even.
        positions: int32/int64 ``[num_tokens]``, contiguous; each below ``cos_sin_cache.shape[0]``.
        cos_sin_cache: ``[max_positions, head_dim]`` (cos | sin), any float dtype; maths is fp32.

    Raises:
        ValueError: on a dtype, shape, stride or device mismatch.

    Grid: one program per token, rotating all its q and k heads.
    """
    dev = q.device
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES, device=dev)
    num_tokens, num_heads, head_dim = q.shape
    check_tensor("k", k, ndim=3, dtypes=(q.dtype,), device=dev)
    check_shape("k", k, (num_tokens, None, head_dim))
    if head_dim % 2:
        raise ValueError(f"q: head_dim {head_dim} must be even")
    check_tensor("positions", positions, ndim=1, dtypes=(torch.int32, torch.int64), contiguous=True, device=dev)
    check_shape("positions", positions, (num_tokens,))
    check_tensor("cos_sin_cache", cos_sin_cache, ndim=2, dtypes=FLOAT_DTYPES, device=dev)
    check_shape("cos_sin_cache", cos_sin_cache, (None, head_dim))
    if num_tokens:
        half = head_dim // 2
        _rotary_kernel[(num_tokens,)](
            q, k, positions, cos_sin_cache,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
            NUM_HEADS=num_heads, HEADS_PAD=next_pow2(num_heads),
            NUM_KV_HEADS=k.shape[1], KV_HEADS_PAD=next_pow2(k.shape[1]),
            HALF=half, HALF_PAD=next_pow2(half), num_warps=4,
        )
    return q, k


def build_cos_sin_cache(inv_freq: torch.Tensor, max_positions: int, dtype=torch.float32) -> torch.Tensor:
    """``[max_positions, 2 * len(inv_freq)]`` table (cos | sin) from (possibly scaled) inverse frequencies."""
    pos = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)
    freqs = pos[:, None] * inv_freq.float()[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype)


def apply_rotary_reference(q, k, positions, cos_sin_cache):
    """Plain-PyTorch ``apply_rotary`` (fp32 maths, in place, returns ``(q, k)``)."""
    cos, sin = cos_sin_cache[positions.long()].float().chunk(2, dim=-1)  # [T, D/2] each
    for x in (q, k):
        x1, x2 = x.float().chunk(2, dim=-1)
        c, s = cos[:, None], sin[:, None]
        x.copy_(torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1))
    return q, k
