"""Torch-free helper for tests that drive an EngineCore with a scripted runner."""

from __future__ import annotations

from collections.abc import Callable

from engine_svc.core.engine_core import EngineCore
from engine_svc.core.request import RequestOutput


def step_until_idle(core: EngineCore, finished: dict[str, RequestOutput], check: Callable[[EngineCore], None],
                    max_steps: int = 500) -> None:
    """Step until the core has no work (at most max_steps: a livelock fails the caller's next
    assertion), recording finished outputs and checking the invariants after every step."""
    for _ in range(max_steps):
        if not core.has_work:
            break
        for out in core.step():
            if out.finished:
                finished[out.request_id] = out
        check(core)
