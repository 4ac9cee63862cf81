"""The garbage collector's view of a service process's heap.

What a service builds before it serves (its imports, torch and the model in an engine, transformers
and the tokenizer in the tokenizer tier, grpc and OpenTelemetry everywhere) lives as long as the
process. Frozen out of the collector's sight, a full collection no longer walks it. Unfrozen it is a
stall of every stream the process carries, and in an engine an idle GPU:
- an engine: one took 0.2 s in bench/engine_host.py's profile; over the ShareGPT-like mix on a
  FakeRunner (bench/gc_pauses.py: the scheduler's objects, no model) two full collections took 214 ms
  together, against one of 3 ms frozen (bench/results/gc-pauses-cpu-2026-12-01.json);
- the tokenizer tier with the stories260k tokenizer loaded through transformers: ~300k objects, a full
  collection 180 ms on the 2-core CI host.
Each service freezes once ready; the benchmarks that drive an EngineCore themselves do the same after
building it, so that they time what is served.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect what startup left, then freeze the rest (process-wide: one service per process).
    Returns the number of objects frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def unfreeze_heap() -> None:
    """Hand the frozen heap back to the collector (at exit, frozen objects are never freed, and native
    extensions report them as leaks)."""
    gc.unfreeze()
