"""Fused RMSNorm with an optional residual add: one read of x (and residual), one write of each output.

Numerics follow transformers' LlamaRMSNorm: the residual add happens in the input dtype, the
normalisation in fp32, then ``weight * normed.to(dtype)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._checks import FLOAT_DTYPES, check_shape, check_tensor, next_pow2


@triton.jit
def _rms_norm_kernel(
    out_ptr,  # [num_rows, hidden]
    res_out_ptr,  # [num_rows, hidden]: x + residual (written only if HAS_RESIDUAL)
    x_ptr,  # [num_rows, hidden], row stride free
    res_ptr,  # [num_rows, hidden] (read only if HAS_RESIDUAL)
    w_ptr,  # [hidden]
    stride_x, stride_r, stride_o, stride_ro,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,  # add residual first and return the sum
    BLOCK: tl.constexpr,  # power of 2 >= hidden: one program holds the whole row
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = x + tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = tl.math.rsqrt(tl.sum(xf * xf, 0) / hidden + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, w * (xf * inv_rms).to(x.dtype), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """``(weight * x_normed, x)`` where x is first replaced by ``x + residual`` when residual is given.

    Args:
        x: ``[num_rows, hidden]`` fp16/bf16/fp32, row stride free, column stride 1.
        weight: ``[hidden]`` in x's dtype, contiguous.
        eps: added to the mean square.
        residual: optional ``[num_rows, hidden]`` in x's dtype, column stride 1.

    Returns:
        ``(out, residual_out)``, both new ``[num_rows, hidden]`` tensors; residual_out is
        ``x + residual`` (the next layer's residual stream) or ``x`` itself when residual is None.

    Raises:
        ValueError: on a dtype, shape, stride or device mismatch.

    Grid: one program per row; hidden sizes up to 64k fit one tile.
    """
    dev = x.device
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES, device=dev)
    num_rows, hidden = x.shape
    check_tensor("weight", weight, ndim=1, dtypes=(x.dtype,), contiguous=True, device=dev)
    check_shape("weight", weight, (hidden,))
    if hidden > 65536:
        raise ValueError(f"x: hidden size {hidden} > 65536 is not supported")
    if residual is not None:
        check_tensor("residual", residual, ndim=2, dtypes=(x.dtype,), device=dev)
        check_shape("residual", residual, (num_rows, hidden))
    out = torch.empty((num_rows, hidden), dtype=x.dtype, device=dev)
    res_out = torch.empty_like(out) if residual is not None else x
    if num_rows == 0:
        return out, res_out
    block = next_pow2(hidden)
    _rms_norm_kernel[(num_rows,)](
        out, res_out, x, residual if residual is not None else x, weight,
        x.stride(0), (residual if residual is not None else x).stride(0), out.stride(0), res_out.stride(0),
        hidden, eps, HAS_RESIDUAL=residual is not None, BLOCK=block,
        num_warps=max(1, min(16, block // 512)),
    )
    return out, res_out


def rms_norm_reference(x, weight, eps, residual=None):
    """Plain-PyTorch ``rms_norm`` (transformers' LlamaRMSNorm order of operations)."""
    if residual is not None:
        x = x + residual
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype), x
