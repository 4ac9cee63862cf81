"""Engine configuration: one validated value object built from CLI flags / KVMESH_* variables."""

from __future__ import annotations

from dataclasses import dataclass

from kvmesh.blocks import KV_CACHE_DTYPES

__all__ = ["KV_CACHE_DTYPES", "ConfigError", "EngineConfig"]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the value and the fix."""


@dataclass
class EngineConfig:
    model: str = "demo"  # an HF directory of safetensors + config.json, or "demo" (built-in tiny model)
    device: str = "cpu"  # "cpu" or "cuda" (or "cuda:N")
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16; auto = the checkpoint's dtype (fp32 on CPU)
    load_format: str = "auto"  # auto = safetensors from `model`; dummy = random weights in the config's shape
    seed: int = 0  # seeds dummy weights
    block_size: int = 16  # tokens per KV block
    max_model_len: int | None = None  # None = the model's own limit
    max_num_seqs: int = 256  # requests in one step at most
    max_num_batched_tokens: int = 2048  # tokens in one step at most (the token budget)
    enable_chunked_prefill: bool = True  # split long prompts over steps within the token budget
    enable_prefix_caching: bool = True  # reuse the KV blocks of cached prompt prefixes across requests
    kv_cache_memory: int | None = None  # bytes for the KV cache (CPU default: 256 MiB); overrides utilization
    gpu_memory_utilization: float = 0.90  # fraction of GPU memory for weights + activations + KV cache
    num_gpu_blocks_override: int | None = None  # tests: force a number of KV blocks
    enforce_eager: bool = False  # CUDA: skip CUDA-graph capture
    # CUDA: steps that are not pure decode (prefill chunks, mixed) of up to this many tokens replay
    # piecewise graphs (engine_svc/piecewise_graphs.py); longer steps run eagerly. 0 = always eager.
    mixed_graph_max_tokens: int = 2048
    kv_cache_dtype: str = "auto"  # auto = the model's dtype; fp8 (= fp8_e4m3): e4m3 K/V, half the bytes
    # Schedule and launch step N+1 while step N runs (stop tokens then apply one step late, the
    # extra token discarded). None = on for CUDA, off on CPU (where a step cannot overlap anything).
    async_scheduling: bool | None = None

    @property
    def overlap(self) -> bool:
        """Whether async scheduling is on (resolving None by the device)."""
        if self.async_scheduling is not None:
            return self.async_scheduling
        return self.device.startswith("cuda")

    def validate(self) -> "EngineConfig":
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ConfigError(f"block_size={self.block_size}: use one of 8, 16, 32, 64, 128")
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs={self.max_num_seqs}: must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens={self.max_num_batched_tokens}: must be >= 1")
        if not (0.05 <= self.gpu_memory_utilization <= 0.99):
            raise ConfigError(
                f"gpu_memory_utilization={self.gpu_memory_utilization}: must be in [0.05, 0.99]")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype={self.dtype!r}: use auto, float32, bfloat16 or float16")
        if self.load_format not in ("auto", "dummy"):
            raise ConfigError(f"load_format={self.load_format!r}: use auto or dummy")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype={self.kv_cache_dtype!r}: use one of {', '.join(KV_CACHE_DTYPES)}")
        if self.mixed_graph_max_tokens < 0:
            raise ConfigError(f"mixed_graph_max_tokens={self.mixed_graph_max_tokens}: must be >= 0 (0 = eager)")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"max_model_len={self.max_model_len}: must be >= 1")
        if not self.enable_chunked_prefill and self.max_model_len is not None \
                and self.max_model_len > self.max_num_batched_tokens:
            raise ConfigError(
                f"max_model_len={self.max_model_len} exceeds max_num_batched_tokens="
                f"{self.max_num_batched_tokens} with chunked prefill off: raise the budget or enable it")
        return self
