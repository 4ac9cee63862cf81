"""A test-only model runner that hangs or fails on command: the real ModelRunner (stories260k on
CPU) behind a switch, handed to the engine through build_engine_core's runner_factory."""

from __future__ import annotations

import threading

from engine_svc.model_runner import ModelRunner


class EngineThreadKilled(BaseException):
    """Escapes the engine loop's error handling: the engine thread dies, as a thread stopped by a bug would."""


class FaultyRunner:
    """Delegates to a real ModelRunner; `hang()` blocks the next model step until `release()`,
    `fail_next(exc)` makes the next step raise exc."""

    instances: list["FaultyRunner"] = []

    def __init__(self, config):
        self._inner = ModelRunner(config)
        self._hang = threading.Event()
        self._released = threading.Event()
        self._failure: BaseException | None = None
        self.hanging = threading.Event()  # set while a step is held
        FaultyRunner.instances.append(self)

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        # Whichever way the engine core drives a model step (execute, or launch under overlap), the
        # step passes the switch; hasattr(runner, "launch") stays the real runner's answer.
        return self._guarded(attr) if name in ("execute", "launch") else attr

    def hang(self) -> None:
        self._released.clear()
        self._hang.set()

    def release(self) -> None:
        self._hang.clear()
        self._released.set()

    def fail_next(self, exc: BaseException) -> None:
        self._failure = exc

    def _guarded(self, step):
        def guarded(*args, **kwargs):
            if self._hang.is_set():
                self.hanging.set()
                self._released.wait(60)
                self.hanging.clear()
            if self._failure is not None:
                exc, self._failure = self._failure, None
                raise exc
            return step(*args, **kwargs)
        return guarded
