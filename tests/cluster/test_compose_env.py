"""The compose cluster's configuration, run without Docker: each kvmesh service of the `cpu` profile
starts with its own `command` and `environment` from docker-compose.yml (so every setting arrives as a
KVMESH_* variable and OTEL_* setting, as in the containers), with only what a container network gives
for free replaced: host names become 127.0.0.1 and fixed ports free ones; the collector is an OTLP
receiver in this test. The compose health check command must pass on every service, each /metrics
endpoint must answer (the collector scrapes them), the router must answer a generation, and its
trace must reach the collector with spans from all three tiers.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import time
import importlib.util
import urllib.request

import pytest
import yaml

from tests.ports import free_port

REPO = pathlib.Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("cluster_otlp_receiver", REPO / "tests/telemetry/otlp_receiver.py")
otlp_receiver = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # the telemetry tier's
_spec.loader.exec_module(otlp_receiver)
BIN = pathlib.Path(sys.executable).parent
STARTUP_S = 150

pytestmark = pytest.mark.slow


def _interpolate(value: str) -> str:
    """Compose's ${NAME:-default} with nothing set in the environment: the default."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


class ComposeService:
    def __init__(self, name: str, spec: dict, log_dir: pathlib.Path):
        self.name = name
        self.spec = spec
        self.port = free_port()
        self.metrics_port = free_port()
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, addresses: dict[str, str]) -> None:
        """Start with the compose environment; `addresses` maps compose "name:port" to loopback."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KVMESH_", "OTEL_"))}
        for key, value in self.spec["environment"].items():
            value = _interpolate(str(value))
            for compose_address, address in addresses.items():
                value = re.sub(rf"\b{re.escape(compose_address)}\b", address, value)
            env[key] = value
        env.update(KVMESH_HOST="127.0.0.1", KVMESH_PORT=str(self.port), KVMESH_METRICS_PORT=str(self.metrics_port))
        command = [str(BIN / self.spec["command"][0]), *self.spec["command"][1:]]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(command, env=env, stdout=log, stderr=log, start_new_session=True)

    def healthy(self) -> bool:
        """The service's compose health check, pointed at this process's port."""
        _cmd, exe, *args = self.spec["healthcheck"]["test"]
        args = [a.replace("127.0.0.1:50051", f"127.0.0.1:{self.port}") for a in args]
        return subprocess.run([str(BIN / exe), *args], capture_output=True, timeout=30).returncode == 0

    def wait_healthy(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"{self.name} exited:\n{self.log_path.read_text()[-3000:]}"
            if self.healthy():
                return
            time.sleep(0.5)
        pytest.fail(f"{self.name} not healthy in time:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            return self.proc.wait(5)


@pytest.fixture()
def collector():
    with otlp_receiver.OtlpReceiver() as receiver:
        yield receiver


def test_cpu_profile_services_configured_by_their_compose_environment(tmp_path, collector):
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    names = ["tokenizer", "engine-0-cpu", "engine-1-cpu", "router"]
    run = {n: ComposeService(n, services[n], tmp_path) for n in names}
    # Each service answers to its compose name and (the cpu engines) to its network alias.
    addresses = {"otel-collector:4317": f"127.0.0.1:{collector.port}"}
    for name, svc in run.items():
        for host in [name, *services[name].get("networks", {}).get("default", {}).get("aliases", [])]:
            addresses[f"{host}:50051"] = f"127.0.0.1:{svc.port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        for name in names[:-1]:
            run[name].start(addresses)
        for name in names[:-1]:
            run[name].wait_healthy(deadline)
        run["router"].start(addresses)  # depends_on: service_healthy
        run["router"].wait_healthy(deadline)

        for svc in run.values():
            with urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/metrics", timeout=10) as r:
                assert r.status == 200 and b"# TYPE" in r.read(), svc.name
        out = subprocess.run([str(BIN / "kvmesh"), "generate", "--router", f"127.0.0.1:{run['router'].port}",
                              "--model", "", "--prompt", "Hello", "--max-tokens", "5", "--json"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert '"completion_tokens": 5' in out.stdout, out.stdout
        # The batch span processor exports every 5 s by default (compose leaves that alone).
        tiers = {"kvmesh-router", "kvmesh-tokenizer", "kvmesh-engine"}
        collector.wait_for(lambda spans: any(tiers <= {s.service for s in spans if s.trace_id == t}
                                             for t in {s.trace_id for s in spans}), timeout_s=20)
    finally:
        codes = {name: run[name].stop() for name in reversed(names)}
    assert codes == {n: 0 for n in names}, codes  # every service drained and exited by itself


def test_a_required_option_can_come_from_the_environment(monkeypatch):
    """Containers configure the router by KVMESH_TOKENIZER / KVMESH_ENGINES alone (required flags)."""
    from kvmesh.serving.config import EnvArgumentParser

    parser = EnvArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    with pytest.raises(SystemExit):
        parser.parse_args([])
    monkeypatch.setenv("KVMESH_TOKENIZER", "tokenizer:50051")
    parser = EnvArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    assert parser.parse_args([]).tokenizer == "tokenizer:50051"
    assert parser.parse_args(["--tokenizer", "t:1"]).tokenizer == "t:1"
