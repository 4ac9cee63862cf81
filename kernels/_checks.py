"""Argument checks shared by the kernel launchers: each failure is a ValueError naming the argument."""

from __future__ import annotations

import functools

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FP8_DTYPES = (torch.float8_e4m3fn,)  # KV cache only (the engine's --kv-cache-dtype fp8)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def check_tensor(name: str, t, *, ndim: int | None = None, dtypes=None, last_contiguous: bool = True,
                 contiguous: bool = False, device: torch.device | None = None) -> None:
    """Raise ValueError unless ``t`` is a tensor with the given rank, dtype, layout and device."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name}: dtype {str(t.dtype).replace('torch.', '')} not supported; use {allowed}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous (strides {t.stride()} for shape {tuple(t.shape)}); "
                         f"call .contiguous() first")
    if last_contiguous and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: the last dim must have stride 1, got strides {t.stride()}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: on {t.device}, expected {device} (all inputs on one device)")


def check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    """Raise ValueError unless ``t.shape`` equals ``shape`` (None entries match anything)."""
    if len(t.shape) != len(shape) or any(s is not None and s != x for s, x in zip(shape, t.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name}: expected shape {want}, got {list(t.shape)}")


def kv_scale_tensor(name: str, scale, num_kv_heads: int, device: torch.device) -> torch.Tensor:
    """An FP8 cache's dequantisation scale as fp32 ``[num_kv_heads]``: a float (per tensor) or a tensor of
    1 or num_kv_heads positive values (per head). Floats are cached per (value, heads, device), so a
    CUDA graph captures no allocation after the first call."""
    if isinstance(scale, torch.Tensor):
        if scale.dtype != torch.float32 or scale.device != device or scale.numel() not in (1, num_kv_heads):
            raise ValueError(f"{name}: expected float32 with 1 or {num_kv_heads} values on {device}, got "
                             f"{str(scale.dtype).replace('torch.', '')} {tuple(scale.shape)} on {scale.device}")
        return scale.reshape(-1).expand(num_kv_heads).contiguous()
    if not float(scale) > 0:
        raise ValueError(f"{name}={scale}: must be > 0")
    return _const_scale(float(scale), num_kv_heads, device)


@functools.lru_cache(maxsize=64)
def _const_scale(value: float, n: int, device: torch.device) -> torch.Tensor:
    return torch.full((n,), value, dtype=torch.float32, device=device)
