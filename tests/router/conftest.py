"""Real processes on loopback for the router tier: one tokenizer and three engines of unequal KV
capacity on stories260k, started once for the whole tests/router package, and routers started per
module over any subset of the engines (a router is cheap to start; an engine is not).

Logs of every child go to one temporary folder, printed when a process fails to start.
"""

from __future__ import annotations

import pathlib
import tempfile
import threading

import pytest

from kvmesh.procs import ServiceProcess, stop_all

# KV blocks per engine (block size 16): unequal on purpose; "b" and "c" are equal to each other.
ENGINE_BLOCKS = {"a": 96, "b": 48, "c": 48}
START_TIMEOUT_S = 180.0
# One torch thread per engine (a tiny model gains nothing from more, and three engines' spinning
# OpenMP threads on a 2-core CI machine slow everything); no trace export without a collector.
CHILD_ENV = {"OMP_NUM_THREADS": "1", "OTEL_TRACES_EXPORTER": "none"}


class Mesh:
    """The shared tokenizer and engines, and a factory for routers over them."""

    def __init__(self, model_dir: pathlib.Path, log_dir: pathlib.Path):
        self.model_dir = model_dir
        self.log_dir = log_dir
        self.tokenizer: ServiceProcess | None = None
        self.engines: dict[str, ServiceProcess] = {}
        self.routers: list[ServiceProcess] = []

    def _log(self, name: str) -> str:
        return str(self.log_dir / f"{name}.log")

    def engine_args(self, name: str) -> list[str]:
        return ["--model", str(self.model_dir), "--num-gpu-blocks-override", str(ENGINE_BLOCKS[name])]

    def start(self) -> "Mesh":
        self.tokenizer = ServiceProcess("tokenizer", "tokenizer", ["--model", str(self.model_dir)],
                                        log_path=self._log("tokenizer"), env=CHILD_ENV, die_with_parent=True).start()
        for name in ENGINE_BLOCKS:
            self.engines[name] = ServiceProcess("engine", f"engine-{name}", self.engine_args(name),
                                                log_path=self._log(f"engine-{name}"), env=CHILD_ENV, die_with_parent=True).start()
        for proc in [self.tokenizer, *self.engines.values()]:
            proc.wait_healthy(START_TIMEOUT_S)
        return self

    def restart_engine(self, name: str) -> ServiceProcess:
        """Start engine `name` again on its old port (after a kill), and wait until it is healthy."""
        old = self.engines[name]
        # die_with_parent ties the child to the starting *thread*: a restart from a worker thread
        # (asyncio.to_thread) would be SIGTERMed when that thread ends, leaving later modules a dead engine.
        proc = ServiceProcess("engine", f"engine-{name}", [*self.engine_args(name), "--port", str(old.port)],
                              log_path=self._log(f"engine-{name}"), env=CHILD_ENV,
                              die_with_parent=threading.current_thread() is threading.main_thread()).start()
        self.engines[name] = proc
        proc.wait_healthy(START_TIMEOUT_S)
        return proc

    def router(self, engines: list[str], *flags: str, env: dict[str, str] | None = None,
               tokenizer: ServiceProcess | None = None, wait: bool = True) -> ServiceProcess:
        """Start a router over the named engines (and the shared tokenizer unless given another) and,
        with wait, wait until it serves (an engine admitted)."""
        targets = ",".join(self.engines[n].address for n in engines)
        proc = ServiceProcess("router", f"router-{len(self.routers)}",
                              ["--tokenizer", (tokenizer or self.tokenizer).address, "--engines", targets,
                               "--heartbeat-ms", "200", *flags],
                              env={**CHILD_ENV, **(env or {})}, log_path=self._log(f"router-{len(self.routers)}"),
                              die_with_parent=True).start()
        self.routers.append(proc)
        if wait:
            proc.wait_healthy(START_TIMEOUT_S)
        return proc

    def stop(self) -> None:
        stop_all([p for p in [*self.routers, *self.engines.values(), self.tokenizer] if p is not None], timeout_s=10)


@pytest.fixture(scope="package")
def mesh(stories260k_dir):
    log_dir = pathlib.Path(tempfile.mkdtemp(prefix="kvmesh-router-tests-"))
    m = Mesh(stories260k_dir, log_dir)
    try:
        m.start()
    except Exception:
        m.stop()
        for log in sorted(log_dir.glob("*.log")):
            print(f"--- {log.name}\n{log.read_text()[-4000:]}")
        raise
    yield m
    m.stop()
