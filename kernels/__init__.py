"""kvmesh Triton kernels: paged attention, KV cache writes and fused layers.

Imports torch and triton only, never the engine. Note: this top-level package shares its import name
with the unrelated `kernels` package on PyPI, which transformers probes for; our distribution's
version (0.x) is far below the range transformers accepts, so it never mistakes us for it (tested).
"""
