"""The KV cache's shared vocabulary: block arithmetic and element types, for the engine, the router
and the launcher (torch-free)."""

from __future__ import annotations

# --kv-cache-dtype values: auto = the model's dtype; fp8 (= fp8_e4m3) = float8_e4m3fn K/V with
# per-tensor scales of 1.0, as vLLM offers: half the bytes per block.
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks that hold `num_tokens` tokens: ceil(num_tokens / block_size)."""
    return -(-num_tokens // block_size)
