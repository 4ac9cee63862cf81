"""SiLU-and-mul for gated MLPs: ``silu(x[..., :I]) * x[..., I:]`` in one pass (fp32 maths)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._checks import FLOAT_DTYPES, check_tensor

BLOCK = 1024  # columns per program


@triton.jit
def _silu_and_mul_kernel(
    out_ptr,  # [num_rows, inter]
    x_ptr,  # [num_rows, 2 * inter]: gate | up, row stride free
    stride_x, stride_o,
    inter,
    BLOCK: tl.constexpr,  # columns per program
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``x = [gate | up]``.

    Args:
        x: ``[num_rows, 2 * inter]`` fp16/bf16/fp32, row stride free, column stride 1.

    Returns:
        A new ``[num_rows, inter]`` tensor in x's dtype (computed in fp32, rounded once).

    Raises:
        ValueError: wrong rank, dtype, stride or an odd last dim.

    Grid: (rows, ceil(inter / BLOCK)).
    """
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    if x.shape[1] % 2:
        raise ValueError(f"x: last dim {x.shape[1]} must be even (gate | up)")
    num_rows, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty((num_rows, inter), dtype=x.dtype, device=x.device)
    if num_rows == 0 or inter == 0:
        return out
    _silu_and_mul_kernel[(num_rows, triton.cdiv(inter, BLOCK))](
        out, x, x.stride(0), out.stride(0), inter, BLOCK=BLOCK, num_warps=4)
    return out


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch ``silu_and_mul`` in fp32, rounded once."""
    gate, up = x.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)
