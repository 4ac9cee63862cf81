"""kvmesh Triton kernels: paged attention, KV cache writes and fused layers.

Imports torch and triton only, never the engine. Note: this top-level package shares its import name
with the unrelated `kernels` package on PyPI, which transformers probes for; our distribution's
version (0.x) is far below the range transformers accepts, so it never mistakes us for it (tested).
"""

from __future__ import annotations

import importlib

# Public names -> defining module, imported on first attribute access (keeps `import kernels` free of
# torch and triton, which matters for transformers' probe and for CPU-only tools).
_EXPORTS = {
    "write_kv_cache": "kv_cache", "write_kv_cache_reference": "kv_cache",
    "paged_attention": "paged_attention", "paged_attention_reference": "paged_attention",
    "rms_norm": "rms_norm", "rms_norm_reference": "rms_norm",
    "apply_rotary": "rotary", "apply_rotary_reference": "rotary", "build_cos_sin_cache": "rotary",
    "silu_and_mul": "activation", "silu_and_mul_reference": "activation",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"kernels.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
