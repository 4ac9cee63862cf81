"""Server bootstrap shared by the three services: health, reflection, error mapping, tracing, size
limits, graceful stop.

Shutdown order (graceful): health goes NOT_SERVING first, so that load balancers and the router
stop sending new work, and long-lived streams that are not work end (health Watch here, a
service's own such as the engine's WatchLoad in its drain hook); then `server.stop(grace)` lets
in-flight RPCs finish for up to `grace` seconds before cancelling them. A server with no work in
flight therefore stops at once, whoever is watching it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from kvmesh.serving.errors import ExceptionMappingInterceptor
from kvmesh.serving.health import DrainingHealthServicer
from kvmesh.telemetry.tracing import server_interceptors

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024

# grpc.reflection.v1 is v1alpha renamed: same messages, same field numbers. grpcio-reflection serves
# only v1alpha, and grpcurl and newer tools ask for v1 first, so v1 is the same servicer under the
# v1 name.
REFLECTION_V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"


def _enable_reflection(server: grpc.aio.Server, service_names: Sequence[str]) -> None:
    """Server reflection under both names, v1alpha and v1; each lists every service, itself included."""
    names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1_SERVICE_NAME]
    reflection.enable_server_reflection(names, server)  # v1alpha
    servicer = reflection.aio.ReflectionServicer(names)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo, request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        REFLECTION_V1_SERVICE_NAME, {"ServerReflectionInfo": v1})])


def server_options(max_message_bytes: int, reuse_port: bool = False) -> list[tuple[str, int]]:
    """Channel arguments for a kvmesh server: size limits and keepalive tolerance. SO_REUSEPORT is
    off unless asked for, so that a second server on a taken port fails to bind instead of sharing
    it; router workers ask for it, behind kvmesh.serving.reuseport's check."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Clients (the router) ping idle connections; accept that instead of answering GOAWAY.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.so_reuseport", int(reuse_port)),
    ]


@dataclass
class RunningServer:
    """A started server and the handles needed to drain and stop it."""

    server: grpc.aio.Server
    health: DrainingHealthServicer
    port: int
    service_names: list[str] = field(default_factory=list)

    async def set_serving(self, serving: bool) -> None:
        """Set every registered service (and the overall "" service) SERVING or NOT_SERVING."""
        status = health_pb2.HealthCheckResponse.SERVING if serving \
            else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def drain(self) -> None:
        """NOT_SERVING for good; health Watch streams end (they are not work to wait for)."""
        await self.health.drain()

    async def stop(self, grace_s: float) -> None:
        """Graceful stop: drain first, then let in-flight RPCs finish for up to grace_s."""
        await self.drain()
        await self.server.stop(grace_s)


async def start_server(
    *,
    register: Callable[[grpc.aio.Server], None],
    service_names: Sequence[str],
    host: str = "127.0.0.1",
    port: int = 0,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    serving: bool = True,
    credentials: grpc.ServerCredentials | None = None,
    reuse_port: bool = False,
    unix_socket: str | None = None,
) -> RunningServer:
    """Build, bind and start a grpc.aio server.

    Args:
        register: adds the service's servicers to the server.
        service_names: full names ("kvmesh.v1.Engine") for health and reflection.
        host, port: where to listen; port 0 picks a free port (read it from the result).
        serving: initial health; engines start NOT_SERVING and flip once warmed up.
        credentials: serve TLS (or mTLS) with these; None = plaintext.
        reuse_port: bind with SO_REUSEPORT (a router worker, behind kvmesh.serving.reuseport.reserve_port).
        unix_socket: also listen on this unix-domain socket path (plaintext: co-located clients dial
            "unix:PATH"; the file's permissions guard it). A socket file already there is replaced (grpc
            unlinks it); any other file there fails the bind.
    Returns:
        The RunningServer, already started.
    Raises:
        RuntimeError when the address cannot be bound.
    """
    server = grpc.aio.server(
        # Tracing outermost: every RPC (auth failures included) runs in a SERVER span that continues
        # the caller's trace; exceptions become statuses inside it.
        interceptors=[*server_interceptors(), *interceptors, ExceptionMappingInterceptor()],
        options=server_options(max_message_bytes, reuse_port),
    )
    register(server)
    health_servicer = DrainingHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    _enable_reflection(server, service_names)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_secure_port(address, credentials) if credentials is not None \
        else server.add_insecure_port(address)
    if bound == 0:
        raise RuntimeError(f"could not bind {address}")
    if unix_socket is not None:
        try:
            server.add_insecure_port(f"unix:{unix_socket}")
        except RuntimeError:  # grpc's own message names no cause
            raise RuntimeError(f"could not bind unix:{unix_socket}: a file other than a socket is there, "
                               "or its directory is missing or not writable") from None
    await server.start()
    running = RunningServer(server=server, health=health_servicer, port=bound,
                            service_names=list(service_names))
    await running.set_serving(serving)
    log.info("listening on %s:%d (%s)", host, bound, ", ".join(service_names))
    return running


def write_port_file(path: str | None, port: int) -> None:
    """Write the bound port atomically, so a launcher polling the file never reads half a number."""
    if not path:
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{port}\n")
    os.replace(tmp, path)


def install_stop_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT set `stop`; the service's main coroutine then drains and exits."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def wait_for_stop(running: RunningServer, stop: asyncio.Event, grace_s: float,
                        before_stop: Callable[[], object] | None = None) -> None:
    """Block until `stop` is set, then drain: NOT_SERVING (health watches end), the optional hook
    (the service's own drain), graceful stop."""
    await stop.wait()
    log.info("draining (grace %.1fs)", grace_s)
    await running.drain()
    if before_stop is not None:
        result = before_stop()
        if asyncio.iscoroutine(result):
            await result
    await running.server.stop(grace_s)
