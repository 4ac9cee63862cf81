"""The engine watchdog: notices a step that makes no progress, and a fatal device error.

The engine thread owns the model; if it hangs (a kernel that never returns, a collective waiting on
a dead peer, a deadlock) or dies, requests would wait forever while health still said SERVING.
The watchdog observes the step loop from outside, through a heartbeat the loop keeps: when a step
started and whether it ended. It runs on the event loop, which a hung engine thread does not block.

- A step running longer than `step_timeout_s`: health NOT_SERVING (the router ejects the engine at
  once), GetStatus phase STALLED with the step and its age. Should the step end after all, the
  engine goes back to READY and SERVING.
- The engine thread gone while not stopping, or a fatal device error in a step (a CUDA error, out of
  memory: the device state can no longer be trusted): every in-flight request ends with a typed
  error (ENGINE_LOST, code UNAVAILABLE), health NOT_SERVING, phase FAILED, and the process exits
  non-zero so that its supervisor (Kubernetes, `kvmesh up`) restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from engine_svc.status import EngineStatusTracker, Phase

log = logging.getLogger(__name__)

DEFAULT_STEP_TIMEOUT_S = 60.0
EXIT_FATAL = 3  # the engine process's exit status after a fatal engine failure

# Substrings of the RuntimeError texts that torch raises for a broken device (CUDA, cuBLAS, NCCL).
_FATAL_TEXTS = ("CUDA error", "CUDA out of memory", "CUBLAS_STATUS", "CUDNN_STATUS", "NCCL error",
                "device-side assert", "illegal memory access", "unspecified launch failure")


class FatalDeviceError(RuntimeError):
    """A device failure the engine cannot recover from in-process (raise it from a runner to say so)."""


def is_fatal_device_error(exc: BaseException) -> bool:
    """True for errors after which the device (and so every request on it) cannot be trusted."""
    if isinstance(exc, (FatalDeviceError, MemoryError)):
        return True
    if type(exc).__name__ in ("OutOfMemoryError", "AcceleratorError"):  # torch.cuda.OutOfMemoryError, ...
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _FATAL_TEXTS)


class StepHeartbeat:
    """What the step loop tells the watchdog: steps begun and ended. Written by the engine thread,
    read by the event loop (plain attribute writes; a torn read only delays a verdict by one check)."""

    def __init__(self) -> None:
        self.num_steps = 0  # steps ended
        self.step_started_at: float | None = None  # monotonic time of the running step's start

    def run(self, step: Callable[[], list]) -> list:
        """Run one step under the heartbeat (the engine loop's only call into the watchdog)."""
        self.step_started_at = time.monotonic()
        try:
            return step()
        finally:
            self.step_started_at = None
            self.num_steps += 1

    def running_for(self, now: float) -> float:
        """Seconds the current step has run (0 when no step runs)."""
        started = self.step_started_at
        return 0.0 if started is None else now - started


class Watchdog:
    """Checks the heartbeat and the engine thread every `interval_s`; acts as the module docstring says.

    Args:
        heartbeat: the engine loop's heartbeat.
        status: the GetStatus phase tracker.
        set_serving: sets health SERVING / NOT_SERVING (a coroutine function).
        thread_alive: whether the engine thread still runs (False once it exited).
        on_fatal: called once with the reason when the engine cannot go on.
        step_timeout_s: the longest a step may run before the engine counts as stalled.
    """

    def __init__(self, heartbeat: StepHeartbeat, status: EngineStatusTracker,
                 set_serving: Callable[[bool], Awaitable[None]], thread_alive: Callable[[], bool],
                 on_fatal: Callable[[str], None], step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S):
        self.heartbeat = heartbeat
        self.status = status
        self._set_serving = set_serving
        self._thread_alive = thread_alive
        self._on_fatal = on_fatal
        self.step_timeout_s = step_timeout_s
        self.interval_s = min(1.0, step_timeout_s / 4)
        self.stalled = False
        self.stopping = False  # set before a deliberate stop: the thread ending is then expected
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="engine-watchdog")

    async def stop(self) -> None:
        self.stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while not self.stopping:
            await asyncio.sleep(self.interval_s)
            await self.check()

    async def check(self) -> None:
        """One look at the engine (also called directly by tests)."""
        if self.stopping:
            return
        if not self._thread_alive():
            self.stopping = True
            self._on_fatal("the engine thread exited unexpectedly")
            return
        age = self.heartbeat.running_for(time.monotonic())
        if age > self.step_timeout_s and not self.stalled:
            self.stalled = True
            reason = (f"step {self.heartbeat.num_steps + 1} has made no progress for {age:.1f}s "
                      f"(bound {self.step_timeout_s:g}s): a hung kernel or a stuck engine thread")
            log.error("watchdog: %s; health NOT_SERVING", reason)
            self.status.enter(Phase.ENGINE_PHASE_STALLED, reason)
            await self._set_serving(False)
        elif self.stalled and age <= self.step_timeout_s:
            self.stalled = False
            log.warning("watchdog: the stalled step ended after all; serving again")
            if self.status.phase == Phase.ENGINE_PHASE_STALLED:
                self.status.enter(Phase.ENGINE_PHASE_READY, "serving (recovered from a stalled step)")
                await self._set_serving(True)
