"""``x @ weight.T (+ bias)`` for the few-row activations of decode steps: one pass over the weight.

A decode step of a batch of B sequences multiplies a [B, K] activation by each [N, K] weight. For
B <= 16 that is a weight stream: every weight byte is read once, the arithmetic is nothing. cuBLAS
reaches ~95% of copy bandwidth on the large projections of an 8B model at B=1 (gate|up, down), but
72-74% on the small ones (q|k|v 4096->6144 and o 4096->4096 run as 64-wide tiles, o with split-K
and a separate reduce kernel: bench/results/step-profile-*-windows.json). Here one program owns
BLOCK_N output columns for every row and walks all of K, so there is no split-K and no second
kernel; BLOCK_N is chosen so that the grid holds a few programs per SM, and num_stages deep
pipelining keeps enough weight bytes in flight.

Each program: acc[BLOCK_M, BLOCK_N] (fp32) += x[:, k:k+BLOCK_K] @ w[n0:n0+BLOCK_N, k:k+BLOCK_K]^T over
K; rows past M are masked (BLOCK_M = 16 covers M <= 16, the smallest tile tl.dot takes).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels._checks import FLOAT_DTYPES, check_tensor

MAX_M = 16  # rows this kernel takes; larger batches go to cuBLAS (its tiles are busy there)


@triton.jit
def _skinny_gemm_kernel(
    out_ptr,  # [M, N]
    x_ptr,  # [M, K], row stride free
    w_ptr,  # [N, K], row stride free
    b_ptr,  # [N]; read only if HAS_BIAS
    M, N, K,
    stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr,
    IEEE_DOT: tl.constexpr,  # fp32 inputs: full-precision dots instead of tf32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no mask on the K axis
):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    w_rows = w_ptr + rn[:, None].to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        if EVEN_K:
            x = tl.load(x_rows + kk[None, :], mask=m_ok[:, None], other=0.0)
            w = tl.load(w_rows + kk[None, :], mask=n_ok[:, None], other=0.0)
        else:
            k_ok = kk < K
            x = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if IEEE_DOT:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def plan(n: int, k: int, device: torch.device) -> dict:
    """Tiles for an [*, k] x [n, k]^T product: the widest BLOCK_N (16..64) that still gives every SM
    at least two programs, BLOCK_K 256 (512-byte rows of bf16 per load), 4 pipeline stages.
    The interpreter (CPU tests) gets small tiles so that a test walks several of them."""
    if device.type != "cuda":
        return dict(block_n=16, block_k=32, num_warps=4, num_stages=1)
    sms = _num_sms(device)
    block_n = 64
    while block_n > 16 and triton.cdiv(n, block_n) < 2 * sms:
        block_n //= 2
    return dict(block_n=block_n, block_k=256 if k >= 256 else max(16, triton.next_power_of_2(k)),
                num_warps=4, num_stages=4)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  out: torch.Tensor | None = None, plan_overrides: dict | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x`` of at most MAX_M rows.

    Args:
        x: ``[M, K]``, M <= MAX_M, fp16/bf16/fp32, column stride 1.
        weight: ``[N, K]`` in x's dtype, column stride 1 (an nn.Linear weight).
        bias: optional ``[N]`` in x's dtype.
        out: optional ``[M, N]`` output in x's dtype, column stride 1 (allocated when not given).
        plan_overrides: for tuning (bench/kernels.py): replace entries of ``plan``'s result.

    Returns:
        ``out``: ``[M, N]`` in x's dtype (fp32 accumulation, rounded once).

    Raises:
        ValueError: on a rank, dtype, stride, device or size mismatch, or M > MAX_M.
    """
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=(x.dtype,), device=x.device)
    m, k = x.shape
    n = weight.shape[0]
    if m > MAX_M:
        raise ValueError(f"x: {m} rows > MAX_M={MAX_M}; use F.linear")
    if weight.shape[1] != k:
        raise ValueError(f"weight: expected [*, {k}] for x of shape {list(x.shape)}, got {list(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=(x.dtype,), device=x.device)
        if bias.shape[0] != n:
            raise ValueError(f"bias: expected [{n}], got {list(bias.shape)}")
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    else:
        check_tensor("out", out, ndim=2, dtypes=(x.dtype,), device=x.device)
        if tuple(out.shape) != (m, n):
            raise ValueError(f"out: expected [{m}, {n}], got {list(out.shape)}")
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand(m, n))
    p = {**plan(n, k, x.device), **(plan_overrides or {})}
    _skinny_gemm_kernel[(triton.cdiv(n, p["block_n"]),)](
        out, x, weight, weight if bias is None else bias, m, n, k,
        x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, IEEE_DOT=x.dtype == torch.float32,
        BLOCK_M=MAX_M, BLOCK_N=p["block_n"], BLOCK_K=p["block_k"], EVEN_K=k % p["block_k"] == 0,
        num_warps=p["num_warps"], num_stages=p["num_stages"])
    return out


def make_linear(max_m: int = MAX_M):
    """A ``linear(x, weight, bias)`` that takes the skinny kernel for inputs of at most ``max_m``
    (<= MAX_M) rows and cuBLAS (F.linear) for the rest; max_m = 0 is F.linear always."""
    max_m = min(max_m, MAX_M)
    f_linear = torch.nn.functional.linear

    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() == 2 and 0 < x.shape[0] <= max_m and x.stride(-1) == 1 and weight.stride(-1) == 1:
            return skinny_linear(x, weight, bias)
        return f_linear(x, weight, bias)
    return linear
