"""grpc.health.v1 for kvmesh servers: grpc's servicer, with Watch streams that end when draining begins.

grpc's own Watch never returns: a watcher (the router watching an engine, a load balancer, a
`kvmesh health --watch`) would hold `server.stop(grace)` open for the whole grace period although
no work is in flight. Here `drain()` sends every watcher a last NOT_SERVING and then ends its stream
with OK, so a draining server stops as soon as its real work is done.
"""

from __future__ import annotations

import asyncio

from grpc_health.v1 import health, health_pb2

_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class DrainingHealthServicer(health.aio.HealthServicer):
    """The standard servicer (Check, Watch, set) plus `drain()`, after which Watch streams end."""

    def __init__(self) -> None:
        super().__init__()
        self.draining = False
        self._statuses: dict[str, int] = {"": health_pb2.HealthCheckResponse.SERVING}
        self._changed = asyncio.Event()

    def _wake_watchers(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def set(self, service: str, status) -> None:
        if self.draining:
            return  # NOT_SERVING for good once draining (as grpc's enter_graceful_shutdown)
        self._statuses[service] = status
        await super().set(service, status)
        self._wake_watchers()

    async def drain(self) -> None:
        """Every service NOT_SERVING for good; each Watch stream sends that and ends."""
        for service in list(self._statuses):
            await self.set(service, _NOT_SERVING)
        self.draining = True
        await self.enter_graceful_shutdown()
        self._wake_watchers()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context) -> None:
        last = None
        while True:
            changed = self._changed
            status = self._statuses.get(request.service, _UNKNOWN)
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            if self.draining:
                return
            await changed.wait()
