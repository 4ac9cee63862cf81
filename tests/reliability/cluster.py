"""Real kvmesh processes on loopback for the reliability tests: start, signal, time and read the
logs of each, the way `kvmesh up` runs them (kvmesh/procs.py)."""

from __future__ import annotations

import pathlib
import time

from kvmesh.procs import ServiceProcess, stop_all

CHILD_ENV = {"OMP_NUM_THREADS": "1", "OTEL_TRACES_EXPORTER": "none"}
START_TIMEOUT_S = 180.0


class Cluster:
    """Processes started by one test; `stop()` ends them all (the fixture calls it)."""

    def __init__(self, model_dir: pathlib.Path, log_dir: pathlib.Path, env: dict[str, str] | None = None):
        self.model_dir, self.log_dir = model_dir, log_dir
        self.env = {**CHILD_ENV, **(env or {})}
        self.procs: list[ServiceProcess] = []

    def _start(self, kind: str, args: list[str]) -> ServiceProcess:
        name = f"{kind}-{len(self.procs)}"
        proc = ServiceProcess(kind, name, args, env=self.env, log_path=str(self.log_dir / f"{name}.log"),
                              die_with_parent=True).start()
        self.procs.append(proc)
        return proc

    def tokenizer(self) -> ServiceProcess:
        return self._start("tokenizer", ["--model", str(self.model_dir)])

    def engine(self, num_blocks: int, *flags: str) -> ServiceProcess:
        return self._start("engine", ["--model", str(self.model_dir), "--num-gpu-blocks-override", str(num_blocks),
                                      "--max-num-batched-tokens", "256", *flags])

    def router(self, tokenizer: ServiceProcess, engines: list[ServiceProcess], *flags: str) -> ServiceProcess:
        return self._start("router", ["--tokenizer", tokenizer.address, "--engines",
                                      ",".join(e.address for e in engines), "--heartbeat-ms", "200", *flags])

    @staticmethod
    def wait_healthy(*procs: ServiceProcess) -> None:
        for proc in procs:
            proc.wait_healthy(START_TIMEOUT_S)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{pathlib.Path(p.log_path).read_text(errors='replace')}"
                         for p in self.procs if pathlib.Path(p.log_path).exists())

    def stop(self) -> None:
        stop_all(self.procs, timeout_s=15)


def sigterm_and_time(proc: ServiceProcess, timeout_s: float = 60.0) -> tuple[int, float]:
    """SIGTERM the process; return its exit code and the seconds it took to exit."""
    t0 = time.monotonic()
    proc.signal_stop()
    code = proc.proc.wait(timeout_s)
    return code, time.monotonic() - t0
