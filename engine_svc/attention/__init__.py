"""Attention backends over the paged KV cache (CPU reference in PyTorch; CUDA through kernels/)."""
