"""The services' event loop: uvloop when installed, asyncio's own when not (or when asked), and
grpc.aio serving and calling on either."""

from __future__ import annotations

import asyncio
import sys

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmesh.serving import event_loop
from kvmesh.serving.channels import create_channel
from kvmesh.serving.server import start_server


async def _health_round_trip() -> tuple[str, int]:
    """A real server and client on the running loop: (the loop's module, the health status)."""
    running = await start_server(register=lambda s: None, service_names=[])
    try:
        async with create_channel(f"127.0.0.1:{running.port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    finally:
        await running.server.stop(0)
    return type(asyncio.get_running_loop()).__module__, reply.status


def test_uvloop_when_installed(monkeypatch):
    pytest.importorskip("uvloop")
    monkeypatch.delenv(event_loop.EVENT_LOOP_ENV, raising=False)
    assert event_loop.loop_name() == "uvloop"
    module, status = event_loop.run(_health_round_trip())
    assert module.startswith("uvloop")
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_asyncio_when_asked(monkeypatch):
    monkeypatch.setenv(event_loop.EVENT_LOOP_ENV, "asyncio")
    assert event_loop.loop_name() == "asyncio"
    module, status = event_loop.run(_health_round_trip())
    assert module.startswith("asyncio")
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_asyncio_when_uvloop_is_missing(monkeypatch):
    """The GPU image has no uvloop: the services start on asyncio's loop, nothing else changes."""
    monkeypatch.delenv(event_loop.EVENT_LOOP_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` raises ImportError
    assert event_loop.loop_factory() is None
    module, status = event_loop.run(_health_round_trip())
    assert module.startswith("asyncio")
    assert status == health_pb2.HealthCheckResponse.SERVING
