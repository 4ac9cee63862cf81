"""The garbage collector's view of an engine process's heap.

Everything built before serving (torch, the model, the CUDA graphs, the KV cache's bookkeeping) lives
as long as the process. Frozen out of the collector's sight, a full collection no longer walks it:
unfrozen, one took 0.2 s in bench/engine_host.py's profile, a stall of every stream and an idle GPU.
Over the ShareGPT-like mix on a FakeRunner (bench/gc_pauses.py: the scheduler's objects, no model) the
unfrozen heap took two full collections, 214 ms together, against one of 3 ms frozen
(bench/results/gc-pauses-cpu-2026-12-01.json). `kvmesh-engine` freezes once ready; the benchmarks
that drive an EngineCore themselves do the same after building it, so that they time what is served.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Collect what startup left, then freeze the rest (process-wide: one engine per process)."""
    gc.collect()
    gc.freeze()


def unfreeze_heap() -> None:
    """Hand the frozen heap back to the collector (at exit, frozen objects are never freed, and native
    extensions report them as leaks)."""
    gc.unfreeze()
