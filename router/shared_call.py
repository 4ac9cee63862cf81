"""What the router's shared streams have in common (one call carrying many requests: the engine's
GenerateStream in router.engine_stream, the tokenizer's DetokenizeSessions in
router.detokenize_sessions): a writer and a reader task that live as long as the call, a failure
that fails every request on it, and a holder that replaces a failed call with a new one for the
next request (the channel reconnects by itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

import grpc

log = logging.getLogger(__name__)


class SharedCall:
    """Base of a shared stream: `_start_tasks` runs its writer and reader, `_fail(why)` ends it
    (idempotent), `close()` both. A subclass sets `_call` and `_peer` (who answers on it), sets
    `_wake` when it has something to send, yields what to send from `_outgoing()`, and hands each
    answer to `_on_message`."""

    failure: Exception | None = None
    _tasks: list[asyncio.Task]
    _call: grpc.aio.StreamStreamCall
    _peer: str
    _wake: asyncio.Event

    def _fail(self, why: str) -> None:
        raise NotImplementedError

    def _on_message(self, message) -> None:
        """One message from the peer: resolve what waits on it."""
        raise NotImplementedError

    def _outgoing(self):
        """The messages to write now (a generator, resumed after each write: what queued meanwhile
        goes in the next one)."""
        raise NotImplementedError

    def _start_tasks(self, name: str) -> None:
        self._wake = asyncio.Event()
        self._tasks = [asyncio.create_task(self._write_loop(), name=f"{name}-writer"),
                       asyncio.create_task(self._read_loop(), name=f"{name}-reader")]

    async def _write_loop(self) -> None:
        try:
            while True:
                # set when something queued: runs after the callbacks ready now, so they gather
                await self._wake.wait()
                self._wake.clear()
                for message in self._outgoing():
                    await self._call.write(message)
        except grpc.aio.AioRpcError as exc:
            self._fail(f"{exc.code().name}: {exc.details()}")
        except asyncio.InvalidStateError:  # the call ended under the write; the reader saw why
            self._fail("the stream ended")

    async def _read_loop(self) -> None:
        try:
            while (message := await self._call.read()) is not grpc.aio.EOF:
                self._on_message(message)
            self._fail(f"the {self._peer} ended the stream")
        except grpc.aio.AioRpcError as exc:
            self._fail(f"{exc.code().name}: {exc.details()}")

    @staticmethod
    def _fail_all(failure: Exception, waiting: dict[int, asyncio.Future], what: str) -> None:
        """Set `failure` on every future still waiting for an answer on the call, and forget them."""
        if waiting:
            log.warning("%s; %d %s waiting on it fail", failure, len(waiting), what)
        for future in waiting.values():
            if not future.done():
                future.set_exception(failure)
        waiting.clear()

    async def close(self) -> None:
        self._fail("closed")
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


CallT = TypeVar("CallT", bound=SharedCall)


class CurrentCall(Generic[CallT]):
    """The shared call in use: made on first use, replaced once it failed (the old one is closed in
    the background)."""

    def __init__(self, make: Callable[[], CallT]):
        self._make = make
        self._call: CallT | None = None
        self._closing: set[asyncio.Future] = set()  # failed calls whose tasks are still winding down

    def get(self) -> CallT:
        if self._call is None or self._call.failure is not None:
            if self._call is not None:
                task = asyncio.ensure_future(self._call.close())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
            self._call = self._make()
        return self._call

    async def close(self) -> None:
        if self._call is not None:
            await self._call.close()
            self._call = None
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
