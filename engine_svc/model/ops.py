"""The few pointwise layers a decoder needs, in two interchangeable implementations.

`TorchOps` is plain PyTorch in transformers' order of operations (the CPU path and the oracle);
`TritonOps` calls our fused kernels (kernels/) on CUDA, where one launch replaces the handful of
small PyTorch kernels that an RMSNorm or a rotary embedding costs; in a decode step of an 8B model
those small launches would otherwise add up to a sizeable share of the step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class TorchOps:
    name = "torch"

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight * normed(x + residual), x + residual); normalise in fp32, scale in x's dtype."""
        if residual is not None:
            x = x + residual
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return weight * normed.to(x.dtype), x

    @staticmethod
    def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
               cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate-half RoPE. q: [T, H, D], k: [T, KVH, D], cos_sin: [P, D] (cos | sin)."""
        cos, sin = cos_sin[positions].chunk(2, dim=-1)  # [T, D/2] each
        cos, sin = cos.unsqueeze(1).to(q.dtype), sin.unsqueeze(1).to(q.dtype)  # [T, 1, D/2]

        def rot(x: torch.Tensor) -> torch.Tensor:
            x1, x2 = x.chunk(2, dim=-1)
            return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return rot(q), rot(k)

    @staticmethod
    def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
        """x = [gate | up] ([T, 2I]) -> silu(gate) * up ([T, I])."""
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class TritonOps:
    name = "triton"

    def __init__(self):
        # Imported here: Triton and kernels/ are only needed on CUDA.
        from kernels.activation import silu_and_mul
        from kernels.rms_norm import rms_norm
        from kernels.rotary import apply_rotary
        self.rms_norm, self.rotary, self.silu_and_mul = rms_norm, apply_rotary, silu_and_mul


def get_layer_ops(device: str | torch.device, name: str | None = None):
    """TritonOps on CUDA, TorchOps elsewhere (or as named)."""
    name = name or ("triton" if torch.device(device).type == "cuda" else "torch")
    if name == "triton":
        return TritonOps()
    if name == "torch":
        return TorchOps()
    raise ValueError(f"unknown layer ops {name!r}: use triton or torch")
