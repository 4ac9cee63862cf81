"""Pick the attention backend for a device: our Triton kernels on CUDA, plain PyTorch elsewhere."""

from __future__ import annotations

import os

import torch

from engine_svc.attention.base import AttentionBackend

BACKENDS = ("triton", "torch")


def get_attention_backend(device: str | torch.device, name: str | None = None) -> AttentionBackend:
    """Return a backend instance. name=None picks "triton" on CUDA and "torch" on CPU.

    Raises:
        ValueError: an unknown name, or "triton" on a non-CUDA device.
    """
    device = torch.device(device)
    if name is None:
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        from engine_svc.attention.torch_backend import TorchAttentionBackend
        return TorchAttentionBackend()
    if name == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"attention backend 'triton' needs a CUDA device (or TRITON_INTERPRET=1), "
                             f"got {device}: use 'torch'")
        # Imported lazily: Triton (and kernels/) are only needed on CUDA.
        from engine_svc.attention.triton_backend import TritonAttentionBackend
        return TritonAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}: use one of {', '.join(BACKENDS)}")
