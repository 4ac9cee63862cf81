"""How much GPU memory one engine instance may give its KV cache, measured from its own baseline.

As vLLM does: before the engine loads anything, take a snapshot of the device (free memory, what
this process's allocator already holds). ``gpu_memory_utilization`` is this engine's share of the
device's total memory; everything the engine added since the snapshot (weights, the profiled peak of
activations, CUDA/cuBLAS/Triton workspaces outside the torch allocator) comes out of that share, and
the rest is the KV cache. Memory that other engines in this process, or other processes, held at
the snapshot is theirs and is never counted against this engine. So a second engine in the same
process (tests do this) or another process on the GPU sizes from its own share, and a share larger
than what was free at the snapshot is refused with both numbers.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass

import torch

from engine_svc.config import ConfigError

log = logging.getLogger(__name__)

GIB = 1 << 30


@dataclass(frozen=True, slots=True)
class MemoryBaseline:
    """The device as it was before this engine loaded anything. Taken by ModelRunner.__init__."""

    device: torch.device
    total: int  # device memory, bytes
    free: int  # free on the device (all processes), bytes
    allocated: int  # held by live tensors of this process (other engines, tests), bytes
    non_torch: int  # used by this process outside the torch allocator (CUDA context, ...), bytes

    @classmethod
    def take(cls, device: torch.device) -> "MemoryBaseline":
        # Garbage of an earlier engine (reference cycles) would otherwise be freed during our
        # profile and make our own usage look smaller than it is.
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize(device)
        free, total = torch.cuda.mem_get_info(device)
        return cls(device, total, free, torch.cuda.memory_allocated(device),
                   _non_torch(device, free, total))


def _non_torch(device: torch.device, free: int, total: int) -> int:
    """Bytes this process uses outside the torch allocator, plus what other processes use."""
    return (total - free) - torch.cuda.memory_reserved(device)


def kv_cache_budget(base: MemoryBaseline, utilization: float, scratch_bytes: int, graph_reserve: int) -> int:
    """Bytes for this engine's KV cache, after its profile run (peak stats reset before it).

    Args:
        base: the snapshot taken before the engine loaded its weights.
        utilization: this engine's share of the device's total memory.
        scratch_bytes: the profile's scratch KV cache (part of the peak, replaced by the real cache).
        graph_reserve: bytes kept for CUDA-graph memory pools captured after sizing.

    Raises:
        ConfigError: the share is more than was free at the snapshot (other engines or processes
            hold the rest), with both numbers and the largest utilization that would fit.
    """
    requested = int(base.total * utilization)
    if requested > base.free:
        raise ConfigError(
            f"gpu_memory_utilization={utilization} asks for {requested / GIB:.1f} GiB of {base.device}, "
            f"but only {base.free / GIB:.1f} GiB of {base.total / GIB:.1f} GiB were free when this engine "
            f"started (other engines or processes hold the rest): use --gpu-memory-utilization "
            f"{base.free / base.total:.2f} or lower")
    torch.cuda.synchronize(base.device)
    free, total = torch.cuda.mem_get_info(base.device)
    own_peak = torch.cuda.max_memory_allocated(base.device) - base.allocated - scratch_bytes
    own_non_torch = max(0, _non_torch(base.device, free, total) - base.non_torch)
    budget = requested - own_peak - own_non_torch - graph_reserve
    log.info("kv sizing: share=%d own_peak=%d own_non_torch=%d graph_reserve=%d budget=%d",
             requested, own_peak, own_non_torch, graph_reserve, budget)
    return budget
