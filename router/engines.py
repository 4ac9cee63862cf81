"""The engine table: one entry per engine address, kept fresh by one watcher task each.

A watcher owns its engine's soft state. It checks health, reads GetInfo, then holds one long-lived
WatchLoad stream and applies every report. An engine is admissible only while its health is SERVING,
its stream is up and it is not draining; on any failure it is ejected at once and the watcher
reconnects with exponential backoff (with jitter), re-admitting the engine on its first report after
health says SERVING again. The request path may also eject an engine whose Generate failed with
UNAVAILABLE; the watcher is the only one that re-admits.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2

from kvmesh.serving.channels import create_channel
from router.engine_client import EngineClient
from router.policy import Candidate

log = logging.getLogger(__name__)


@dataclass
class Backoff:
    """Exponential backoff with full jitter; reset after a success."""

    initial_s: float = 0.2
    max_s: float = 5.0
    _next: float = 0.0

    def delay(self) -> float:
        self._next = min(self.max_s, max(self.initial_s, self._next * 2))
        return random.uniform(self._next / 2, self._next)

    def reset(self) -> None:
        self._next = 0.0


class EngineWatcher:
    """Keeps one Engine's health, info and load fresh; ejects and re-admits it."""

    def __init__(self, engine: EngineClient, *, min_interval_ms: int, heartbeat_ms: int,
                 on_change=lambda: None):
        self.engine = engine
        self._min_interval_ms = min_interval_ms
        self._heartbeat_ms = heartbeat_ms
        self._on_change = on_change
        self._backoff = Backoff()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"watch-{self.engine.address}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        e = self.engine
        while True:
            try:
                await self._connect_once()
                reason = "load stream ended"
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                reason = f"{exc.code().name}: {exc.details()}"
            except (_NotServing, _Recheck) as exc:
                reason = e.ejected_reason or str(exc)
            except Exception as exc:  # noqa: BLE001 - a watcher must survive anything and retry
                log.exception("watcher for %s failed", e.address)
                reason = f"watcher error: {type(exc).__name__}"
            e.stream_up = False
            e.healthy = False
            e.eject(reason)
            self._on_change()
            await asyncio.sleep(self._backoff.delay())

    async def _connect_once(self) -> None:
        e = self.engine
        if not await e.check_health(timeout=5.0):
            raise _NotServing()
        await e.fetch_info(timeout=5.0)
        e.healthy = True
        call = e.watch_load(self._min_interval_ms, self._heartbeat_ms)
        e.recheck.clear()
        tasks = {asyncio.create_task(self._read_load(call)), asyncio.create_task(self._watch_health()),
                 asyncio.create_task(self._wait_recheck())}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises the stream's error, or _NotServing
        finally:
            call.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _read_load(self, call) -> None:
        e = self.engine
        async for report in call:
            e.apply_report(report)
            if (not e.stream_up or e.ejected_reason) and not e.recheck.is_set():
                e.stream_up = True
                if e.healthy:
                    if e.ejected_reason:
                        log.info("admitting engine %s (%s)", e.address, report.engine_id)
                    e.ejected_reason = ""
                    self._backoff.reset()
                self._on_change()

    async def _wait_recheck(self) -> None:
        await self.engine.recheck.wait()
        raise _Recheck()

    async def _watch_health(self) -> None:
        """Returns (by raising _NotServing) as soon as health leaves SERVING."""
        async for reply in self.engine.watch_health():
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                self.engine.healthy = False
                self.engine.eject("health NOT_SERVING")
                raise _NotServing()
        raise _NotServing()


class _NotServing(Exception):
    def __str__(self) -> str:
        return "health is not SERVING"


class _Recheck(Exception):
    def __str__(self) -> str:
        return "a request failed on it"


class EnginePool:
    """All known engines by address: membership (from discovery), watchers and candidate snapshots."""

    def __init__(self, *, staleness_bound_s: float, max_message_bytes: int,
                 min_interval_ms: int = 20, heartbeat_ms: int = 500, on_change=lambda: None,
                 engine_stream: str = "auto"):
        self.staleness_bound_s = staleness_bound_s
        self._max_message_bytes = max_message_bytes
        self._min_interval_ms = min_interval_ms
        self._heartbeat_ms = heartbeat_ms
        self._on_change = on_change
        self._engine_stream = engine_stream  # EngineClient's choice of GenerateStream or Generate
        self.engines: dict[str, EngineClient] = {}
        self._watchers: dict[str, EngineWatcher] = {}
        self._background: set[asyncio.Future] = set()  # watcher stops and channel closes under way

    def set_addresses(self, addresses: set[str]) -> None:
        """Start watching new addresses; retire vanished ones (closed once their requests end)."""
        for addr in sorted(addresses - self.engines.keys()):
            channel = create_channel(addr, max_message_bytes=self._max_message_bytes)
            engine = EngineClient(addr, channel, self._engine_stream)
            self.engines[addr] = engine
            watcher = EngineWatcher(engine, min_interval_ms=self._min_interval_ms,
                                    heartbeat_ms=self._heartbeat_ms, on_change=self._on_change)
            self._watchers[addr] = watcher
            watcher.start()
            log.info("watching engine %s", addr)
        for addr in sorted(self.engines.keys() - addresses):
            log.info("engine %s left discovery", addr)
            self.engines[addr].removed = True
            self._in_background(self._watchers.pop(addr).stop())
            self._close_if_idle(addr)
        self._on_change()

    def _close_if_idle(self, address: str) -> None:
        engine = self.engines.get(address)
        if engine is not None and engine.removed and engine.in_flight == 0:
            del self.engines[address]
            self._in_background(engine.close())

    def _in_background(self, coro) -> None:
        # The loop holds tasks weakly: keep each until it is done, or it may be collected pending.
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def ready(self) -> list[EngineClient]:
        return [e for e in self.engines.values() if e.admissible]

    def candidates(self, exclude: set[str] = frozenset()) -> list[Candidate]:
        now = time.monotonic()
        return [e.candidate(self.staleness_bound_s, now) for e in self.ready() if e.address not in exclude]

    def begin(self, address: str, request_id: str, num_blocks: int) -> EngineClient:
        """Count the request's blocks as pending, and the request in flight, on the chosen engine."""
        engine = self.engines[address]
        engine.begin(request_id, num_blocks)
        return engine

    def end(self, engine: EngineClient, request_id: str) -> None:
        engine.end(request_id)
        self._close_if_idle(engine.address)

    async def close(self) -> None:
        for watcher in list(self._watchers.values()):
            await watcher.stop()
        for engine in self.engines.values():
            await engine.close()
