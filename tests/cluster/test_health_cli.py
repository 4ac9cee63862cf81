"""`kvmesh health`, the compose health check, against a real grpc.health.v1 server."""

from __future__ import annotations

import socket
import subprocess
import sys
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


@pytest.fixture()
def health_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port, servicer
    server.stop(None)


def _health(*args: str) -> subprocess.CompletedProcess:
    # The console script's code path, in a fresh interpreter as the container runs it.
    return subprocess.run([sys.executable, "-m", "kvmesh.cli.main", "health", *args],
                          capture_output=True, text=True, timeout=60)


def test_exit_status_follows_the_serving_status(health_server):
    port, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    out = _health(f"127.0.0.1:{port}")
    assert out.returncode == 0 and "SERVING" in out.stdout
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    out = _health(f"127.0.0.1:{port}")
    assert out.returncode == 1 and "NOT_SERVING" in out.stdout
    out = _health("--port", str(port), "--service", "kvmesh.v1.Nope")
    assert out.returncode == 1 and "NOT_FOUND" in out.stderr


def test_unreachable_server_is_exit_2():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = _health(f"127.0.0.1:{port}", "--timeout", "1")
    assert out.returncode == 2 and "UNAVAILABLE" in out.stderr
