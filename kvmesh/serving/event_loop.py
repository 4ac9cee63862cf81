"""The event loop a kvmesh service runs on: uvloop where it is installed, asyncio's own otherwise.

A request's first token crosses the router's and the tokenizer's loops several times (grpc.aio
hands each completion from its poller thread to the loop), so the cost of one loop iteration is
paid on every hop. uvloop is optional: an image without it (the GPU image) runs on asyncio's
loop unchanged. KVMESH_EVENT_LOOP=asyncio forces asyncio's loop (a same-host A/B).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)

EVENT_LOOP_ENV = "KVMESH_EVENT_LOOP"
# How early a timer may fire: libuv counts whole milliseconds (its clock is truncated to the
# millisecond and a delay rounded to one), so a uvloop timer can run up to ~1.5 ms before its
# delay has passed; asyncio's never does.
TIMER_SLACK_S = 0.002


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop constructor, or None for asyncio's default (uvloop absent, or not wanted)."""
    if os.environ.get(EVENT_LOOP_ENV, "uvloop") == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def deadline_timer_s(timeout: float | None) -> float | None:
    """The delay of a local timer that enforces a caller's deadline `timeout` seconds from now:
    never before the deadline, on either loop. Otherwise, under uvloop, a server's own expiry can
    beat its caller's (which it learned a transit time late) and end the call with an answer where
    the caller expects its DEADLINE_EXCEEDED. Deadlines passed on to gRPC calls need none."""
    return None if timeout is None else timeout + TIMER_SLACK_S


def loop_name() -> str:
    """"uvloop" or "asyncio": what run() would use here."""
    return "asyncio" if loop_factory() is None else "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(main) on the chosen loop."""
    factory = loop_factory()
    log.info("event loop: %s", "asyncio" if factory is None else "uvloop")
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
