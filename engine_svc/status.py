"""Startup and shutdown phase tracking for GetStatus (thread-safe: the engine thread advances it).

Phases in order: LOADING_WEIGHTS, ALLOCATING_KV, COMPILING, WARMING_UP, READY, then DRAINING at
shutdown, or FAILED. The seconds each finished phase took make the startup breakdown.
"""

from __future__ import annotations

import threading
import time

from kvmesh.v1 import engine_pb2

Phase = engine_pb2.EnginePhase


class EngineStatusTracker:
    """The current phase, its progress (0..1) and detail, and the duration of each finished phase."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._phase = Phase.ENGINE_PHASE_LOADING_WEIGHTS
        self._phase_start = self._start
        self._progress = 0.0
        self._detail = "starting"
        self._seconds: dict[str, float] = {}

    @property
    def phase(self) -> int:
        return self._phase

    def enter(self, phase: int, detail: str = "") -> None:
        """Finish the current phase (record its seconds) and start `phase`."""
        with self._lock:
            now = time.monotonic()
            name = Phase.Name(self._phase).removeprefix("ENGINE_PHASE_")
            self._seconds[name] = self._seconds.get(name, 0.0) + now - self._phase_start
            self._phase, self._phase_start = phase, now
            self._progress, self._detail = 0.0, detail

    def progress(self, fraction: float, detail: str | None = None) -> None:
        with self._lock:
            self._progress = min(max(float(fraction), 0.0), 1.0)
            if detail is not None:
                self._detail = detail

    def fail(self, reason: str) -> None:
        self.enter(Phase.ENGINE_PHASE_FAILED, reason)

    def phase_seconds(self) -> dict[str, float]:
        with self._lock:
            return dict(self._seconds)

    def to_proto(self) -> engine_pb2.EngineStatus:
        with self._lock:
            return engine_pb2.EngineStatus(
                phase=self._phase, progress=self._progress, detail=self._detail,
                uptime_s=time.monotonic() - self._start, phase_seconds=dict(self._seconds))
