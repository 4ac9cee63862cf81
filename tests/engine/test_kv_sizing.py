"""KV sizing per engine instance (engine_svc/kv_sizing.py) on a simulated device: what other engines
or processes held at the baseline is theirs; this engine's share pays only for what it added."""

from __future__ import annotations

import pytest
import torch

from engine_svc import kv_sizing
from engine_svc.config import ConfigError

GIB = 1 << 30


class FakeDevice:
    """torch.cuda's memory queries over plain numbers (bytes)."""

    def __init__(self, total, used_elsewhere, allocated, reserved, non_torch):
        self.total, self.elsewhere = total, used_elsewhere
        self.allocated, self.reserved, self.non_torch, self.peak = allocated, reserved, non_torch, allocated

    def install(self, monkeypatch):
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "mem_get_info", lambda d=None: (self.total - self.used, self.total))
        monkeypatch.setattr(cuda, "memory_allocated", lambda d=None: self.allocated)
        monkeypatch.setattr(cuda, "memory_reserved", lambda d=None: self.reserved)
        monkeypatch.setattr(cuda, "max_memory_allocated", lambda d=None: self.peak)
        monkeypatch.setattr(cuda, "synchronize", lambda d=None: None)
        monkeypatch.setattr(cuda, "empty_cache", lambda: None)

    @property
    def used(self):
        return self.elsewhere + self.reserved + self.non_torch

    def grow(self, tensors, peak_extra=0, non_torch=0):
        self.allocated += tensors
        self.reserved += tensors + peak_extra
        self.peak = max(self.peak, self.allocated + peak_extra)
        self.non_torch += non_torch


@pytest.mark.parametrize("others", [0, 30 * GIB])
def test_share_pays_only_for_this_engine(monkeypatch, others):
    # `others`: another engine of this process holds 30 GiB; another process holds 10 GiB.
    dev = FakeDevice(total=100 * GIB, used_elsewhere=10 * GIB, allocated=others, reserved=others,
                     non_torch=GIB // 2)
    dev.install(monkeypatch)
    base = kv_sizing.MemoryBaseline.take(torch.device("cuda"))
    dev.grow(4 * GIB, peak_extra=3 * GIB, non_torch=GIB // 4)  # weights; profile activations + scratch
    budget = kv_sizing.kv_cache_budget(base, 0.4, scratch_bytes=GIB, graph_reserve=GIB // 4)
    assert budget == 40 * GIB - (4 + 3 - 1) * GIB - GIB // 4 - GIB // 4


def test_share_beyond_free_memory_is_refused(monkeypatch):
    dev = FakeDevice(total=100 * GIB, used_elsewhere=0, allocated=60 * GIB, reserved=60 * GIB, non_torch=GIB)
    dev.install(monkeypatch)
    base = kv_sizing.MemoryBaseline.take(torch.device("cuda"))
    with pytest.raises(ConfigError, match=r"gpu_memory_utilization=0.5 asks for 50.0 GiB .* only 39.0 GiB "
                                          r"of 100.0 GiB .*--gpu-memory-utilization 0.39"):
        kv_sizing.kv_cache_budget(base, 0.5, scratch_bytes=0, graph_reserve=0)
