"""Start kvmesh services as child processes and wait until they are healthy.

Used by `kvmesh up` and by the end-to-end tests, so that both exercise the same start order,
the same health gate and the same shutdown. Each child listens on `--port 0` and writes its bound
port to a file (no racy free-port guessing); readiness is the standard gRPC health check.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICE_MODULES = {
    "tokenizer": "tokenizer_svc.server",
    "engine": "engine_svc.server",
    "router": "router.server",
}


@dataclass
class ServiceProcess:
    """One child service process."""

    kind: str  # "tokenizer", "engine" or "router"
    name: str  # unique label, e.g. "engine-0"
    args: list[str]  # extra command-line flags
    env: dict[str, str] = field(default_factory=dict)
    log_path: str | None = None  # None = inherit the parent's stderr
    proc: subprocess.Popen | None = None
    port: int | None = None
    _port_file: str = ""

    @property
    def address(self) -> str:
        assert self.port is not None, f"{self.name} has not reported its port yet"
        return f"127.0.0.1:{self.port}"

    def start(self) -> "ServiceProcess":
        fd, self._port_file = tempfile.mkstemp(prefix=f"kvmesh-{self.name}-", suffix=".port")
        os.close(fd)
        os.unlink(self._port_file)  # the child creates it atomically once it is listening
        cmd = [sys.executable, "-m", SERVICE_MODULES[self.kind], "--host", "127.0.0.1", "--port", "0",
               "--port-file", self._port_file, *self.args]
        out = open(self.log_path, "ab") if self.log_path else None
        self.proc = subprocess.Popen(cmd, env={**os.environ, **self.env}, stdout=out, stderr=out,
                                     start_new_session=True)  # Ctrl-C reaches us, not every child
        return self

    def wait_listening(self, timeout_s: float) -> int:
        """Wait until the child wrote its port file; raise if it exited or the time ran out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            if os.path.exists(self._port_file):
                with open(self._port_file) as f:
                    text = f.read().strip()
                if text:
                    self.port = int(text)
                    return self.port
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} did not start listening within {timeout_s:.0f}s")

    def wait_healthy(self, timeout_s: float, service: str = "") -> None:
        """Wait until grpc.health.v1 says SERVING (engines say so only after warm-up)."""
        deadline = time.monotonic() + timeout_s
        if self.port is None:
            self.wait_listening(timeout_s)
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                self._check_alive()
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise TimeoutError(f"{self.name} was not SERVING within {timeout_s:.0f}s")

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            where = f"; see {self.log_path}" if self.log_path else ""
            raise RuntimeError(f"{self.name} exited with code {self.proc.returncode}{where}")

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM (the service drains), then SIGKILL after timeout_s. Returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)
        finally:
            if os.path.exists(self._port_file):
                os.unlink(self._port_file)

    def kill(self) -> None:
        """SIGKILL at once (tests of a replica lost mid-burst)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
