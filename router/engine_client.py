"""The router's side of one engine replica: its stubs and shared GenerateStream (router.engine_stream),
its load as last reported, the blocks the router sent it that no report reflects yet
(router.pending), and its admission state.

Every call the router makes to an engine goes through EngineClient (the request path: generate,
abort; the watcher: health, info, WatchLoad), so that the pending-block bookkeeping that must follow
a response cannot be forgotten by a caller: `first_response()` and `last_response()` do it.
Mutated only on the router's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from opentelemetry import propagate, trace

from kvmesh.load import LoadSnapshot, from_report
from kvmesh.telemetry.tracing import tracing_enabled
from kvmesh.v1 import common_pb2, engine_pb2, engine_pb2_grpc
from router.engine_stream import EngineStream, StreamedCall
from router.pending import PendingLedger
from router.policy import Candidate
from router.shared_call import CurrentCall

log = logging.getLogger(__name__)

ENGINE_SERVICE = "kvmesh.v1.Engine"
ABORT_TIMEOUT_S = 2.0


class EngineClient:
    """One engine replica as the router sees it, and the only way the router calls it."""

    def __init__(self, address: str, channel: grpc.aio.Channel, engine_stream: str = "auto"):
        self.address = address
        self.channel = channel
        self._stub = engine_pb2_grpc.EngineStub(channel)
        # "auto": the shared GenerateStream when the engine offers it and this router does not trace
        # (a traced request keeps its own Generate call and the engine's SERVER span); "shared":
        # whenever offered, the trace context travelling in each request; "per_request": never.
        self._engine_stream = engine_stream
        self.stream = CurrentCall(lambda: EngineStream(self._stub))  # the shared GenerateStream
        self.multiplexed = False  # requests ride the shared GenerateStream (decided by fetch_info)
        self._health = health_pb2_grpc.HealthStub(channel)
        self.info: common_pb2.ServiceInfo | None = None
        self.report: common_pb2.LoadReport | None = None  # the newest report applied
        self.load: LoadSnapshot | None = None  # its load fields
        self.report_received_at = 0.0  # router monotonic clock
        self.healthy = False  # health SERVING, as last checked
        self.stream_up = False  # WatchLoad delivering
        self.ejected_reason = "not yet connected"  # "" when admissible
        self.in_flight = 0  # requests this router has open on the engine
        self.pending = PendingLedger()
        self.removed = False  # gone from discovery; closed once idle
        self.num_ejections = 0
        # Set by the request path on a failed call: the watcher drops its streams and re-checks health
        # (with backoff) before re-admitting, instead of trusting the next load report.
        self.recheck = asyncio.Event()
        # Abort calls in flight: held here, since the event loop keeps only weak references to
        # tasks and one collected while pending would be logged as destroyed.
        self._aborts: set[asyncio.Future] = set()

    @property
    def admissible(self) -> bool:
        return (not self.ejected_reason and not self.removed and self.healthy and self.stream_up
                and self.info is not None and self.report is not None and not self.report.draining)

    @property
    def engine_id(self) -> str:
        return self.report.engine_id if self.report is not None else self.address

    # ---- the request path ----

    def begin(self, request_id: str, num_blocks: int) -> None:
        """A request is about to be sent here, needing num_blocks at its largest."""
        self.pending.add(request_id, num_blocks)
        self.in_flight += 1

    def end(self, request_id: str) -> None:
        """The request is over (any way): its blocks are no longer pending here."""
        self.pending.release(request_id)
        self.in_flight -= 1

    def generate(self, request: engine_pb2.GenerateRequest, timeout: float | None):
        """Start a request: a Generate call, or a StreamedCall on the shared GenerateStream, read
        alike (`read()`, `async for`); the caller cancels it when done."""
        if not self.multiplexed:
            return self._stub.Generate(request, timeout=timeout)
        span = trace.get_current_span()
        if span.is_recording():  # the request's own trace context: one call carries many requests
            propagate.inject(request.trace_context)
        return self.stream.get().start(request, timeout)

    def first_response(self, request_id: str, response: engine_pb2.GenerateResponse) -> None:
        """The engine answered: its attached report (include_load) is the first that counts the
        request, so from that report on the request's blocks are no longer pending."""
        if response.HasField("load"):
            self.apply_report(response.load)
            self.pending.ack(request_id, response.load.sequence)
        else:
            self.pending.ack(request_id, None)

    def last_response(self, response: engine_pb2.GenerateResponse) -> None:
        """The final response of a request: take its report, if attached."""
        if response.HasField("load"):
            self.apply_report(response.load)

    def abort(self, request_id: str, call=None) -> None:
        """Ask the engine to stop the request at its next step, without waiting for the answer (on
        the shared stream when `call` rides it: a cancel message, no RPC of its own)."""
        if isinstance(call, StreamedCall):
            call.abort()
            return
        call = self._stub.Abort(engine_pb2.AbortRequest(request_id=request_id), timeout=ABORT_TIMEOUT_S)
        task = asyncio.ensure_future(call)
        self._aborts.add(task)
        task.add_done_callback(self._abort_done)

    def _abort_done(self, task: asyncio.Future) -> None:
        self._aborts.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a failure only means "already gone"

    # ---- load and admission (watcher and request path) ----

    def apply_report(self, report: common_pb2.LoadReport) -> None:
        """Take a report (pushed or attached to a Generate response) if it is newer than the one held."""
        old = self.report
        if old is not None and report.engine_id == old.engine_id and report.sequence <= old.sequence:
            return  # out of order or duplicate
        if old is not None and report.engine_id != old.engine_id:
            log.info("engine %s restarted (id %s -> %s)", self.address, old.engine_id, report.engine_id)
            self.pending.reset()
        self.report = report
        self.load = from_report(report)
        self.report_received_at = time.monotonic()
        self.pending.on_report(report.sequence)

    def eject(self, reason: str, *, recheck: bool = False) -> None:
        if not self.ejected_reason:
            log.warning("ejecting engine %s: %s", self.address, reason)
            self.num_ejections += 1
        self.ejected_reason = reason
        if recheck:
            self.recheck.set()

    def candidate(self, staleness_bound_s: float, now: float) -> Candidate:
        load, report = self.load, self.report
        assert load is not None and report is not None and self.info is not None
        age = now - self.report_received_at
        return Candidate(
            address=self.address, engine_id=report.engine_id, block_size=load.block_size or self.info.kv_block_size,
            total_blocks=load.total_blocks, free_blocks=load.free_blocks, cached_blocks=load.cached_blocks,
            reserved_blocks=load.reserved_blocks, waiting_tokens=load.num_waiting_tokens,
            pending_blocks=self.pending.pending_blocks, in_flight=self.in_flight, report_age_s=age,
            stale=age > staleness_bound_s)

    # ---- the watcher's calls ----

    async def check_health(self, timeout: float) -> bool:
        reply = await self._health.Check(health_pb2.HealthCheckRequest(service=ENGINE_SERVICE), timeout=timeout)
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def watch_health(self):
        """The health Watch stream of the engine service (replies with .status)."""
        return self._health.Watch(health_pb2.HealthCheckRequest(service=ENGINE_SERVICE))

    async def fetch_info(self, timeout: float) -> common_pb2.ServiceInfo:
        self.info = await self._stub.GetInfo(common_pb2.GetInfoRequest(), timeout=timeout)
        offered = "generate_stream" in self.info.capabilities
        wanted = self._engine_stream == "shared" or (self._engine_stream == "auto" and not tracing_enabled())
        if offered and wanted and not self.multiplexed:
            log.info("engine %s: requests on one shared GenerateStream", self.address)
        self.multiplexed = offered and wanted
        return self.info

    async def close(self) -> None:
        """Close the shared stream (its requests fail) and the channel."""
        await self.stream.close()
        await self.channel.close()

    def watch_load(self, min_interval_ms: int, heartbeat_ms: int):
        """The WatchLoad stream (the caller applies each report and cancels it when done)."""
        return self._stub.WatchLoad(engine_pb2.WatchLoadRequest(min_interval_ms=min_interval_ms,
                                                                heartbeat_ms=heartbeat_ms))
