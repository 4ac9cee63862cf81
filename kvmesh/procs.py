"""Start kvmesh services as child processes and wait until they are healthy.

Used by `kvmesh up` and by the end-to-end tests, so that both exercise the same start order,
the same health gate and the same shutdown. Each child listens on `--port 0` (unless given a port:
`kvmesh up` puts the router on 50051) and writes its bound port to a file (no racy free-port
guessing); readiness is the standard gRPC health check.
"""

from __future__ import annotations

import os
import shutil
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
    # Linux: the child gets SIGTERM if this process dies (even by SIGKILL), so a killed launcher
    # leaves no orphans. Call start() from the main thread: the signal fires when the *thread* that
    # started the child exits.
    die_with_parent: bool = False
    # The child leads its own session (Ctrl-C reaches the launcher, which stops the children in
    # order). False for a router worker: it stays in its parent router's process group, so that
    # whatever stops that group stops its workers too.
    new_session: bool = True
    host: str = "127.0.0.1"  # --host of the child; its address is loopback unless it binds one address
    listen_port: int = 0  # --port of the child; 0 = any free port (read back from the port file)
    proc: subprocess.Popen | None = None
    port: int | None = None
    _port_file: str = ""
    _reaped: bool = False

    @property
    def address(self) -> str:
        assert self.port is not None, f"{self.name} has not reported its port yet"
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host  # a wildcard bind: loopback
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def start(self) -> "ServiceProcess":
        fd, self._port_file = tempfile.mkstemp(prefix=f"kvmesh-{self.name}-", suffix=".port")
        os.close(fd)
        os.unlink(self._port_file)  # the child creates it atomically once it is listening
        cmd = [sys.executable, "-m", SERVICE_MODULES[self.kind], "--host", self.host, "--port", str(self.listen_port),
               "--port-file", self._port_file, *self.args]
        if self.die_with_parent and shutil.which("setpriv"):
            # setpriv (util-linux) sets PR_SET_PDEATHSIG and execs; a preexec_fn would do the same but
            # is unsafe once grpc has started threads in this process.
            cmd = ["setpriv", "--pdeathsig", "TERM", "--", *cmd]
        out = open(self.log_path, "ab") if self.log_path else None
        self.proc = subprocess.Popen(cmd, env={**os.environ, **self.env}, stdout=out, stderr=out,
                                     start_new_session=self.new_session)
        return self

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def poll_port(self) -> int | None:
        """The bound port once the child wrote its port file, else None (never blocks)."""
        if self.port is None and os.path.exists(self._port_file):
            with open(self._port_file) as f:
                text = f.read().strip()
            if text:
                self.port = int(text)
        return self.port

    def wait_listening(self, timeout_s: float) -> int:
        """Wait until the child wrote its port file; raise if it exited or the time ran out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            if self.poll_port() is not None:
                return self.port
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} did not start listening within {timeout_s:.0f}s")

    def is_serving(self, channel: grpc.Channel, service: str = "", timeout_s: float = 1.0) -> bool:
        """One grpc.health.v1 check over `channel` (to self.address); False on any RPC error."""
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def wait_healthy(self, timeout_s: float, service: str = "") -> None:
        """Wait until grpc.health.v1 says SERVING (engines say so only after warm-up)."""
        deadline = time.monotonic() + timeout_s
        if self.port is None:
            self.wait_listening(timeout_s)
        with grpc.insecure_channel(self.address) as channel:
            while time.monotonic() < deadline:
                self.check_alive()
                if self.is_serving(channel, service):
                    return
                time.sleep(0.1)
        raise TimeoutError(f"{self.name} was not SERVING within {timeout_s:.0f}s")

    def check_alive(self) -> None:
        """Raise RuntimeError (naming the log file) if the child has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            where = f"; see {self.log_path}" if self.log_path else ""
            raise RuntimeError(f"{self.name} exited with code {self.proc.returncode}{where}")

    def signal_stop(self) -> None:
        """Send SIGTERM (the service drains) without waiting; see stop() and stop_all()."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM (the service drains), then SIGKILL after timeout_s. Returns the exit code."""
        if self.proc is None:
            return None
        self.signal_stop()
        return self._reap(time.monotonic() + timeout_s)

    def _reap(self, deadline: float) -> int:
        """Wait for the child until `deadline`, SIGKILL it past that, and clean up after it (once)."""
        if self._reaped:
            return self.proc.returncode
        try:
            return self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)
        finally:
            self._reaped = True
            # The child led its own session: kill anything it left behind in its process group.
            if self.new_session:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            if os.path.exists(self._port_file):
                os.unlink(self._port_file)

    def kill(self) -> None:
        """SIGKILL at once (tests of a replica lost mid-burst)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def stop_all(services: list[ServiceProcess], timeout_s: float = 15.0) -> dict[str, int | None]:
    """Stop several children in parallel: SIGTERM to all, one shared deadline, SIGKILL stragglers.

    Returns:
        name -> exit code (None for a child that was never started).
    """
    for s in services:
        s.signal_stop()
    deadline = time.monotonic() + timeout_s
    return {s.name: (None if s.proc is None else s._reap(deadline)) for s in services}
