"""A whole kvmesh cluster as local processes on loopback: what `kvmesh up` runs.

Start order is health-gated: the tokenizer and the engines start together (engines take longest:
weights, KV cache, warm-up), the router starts once all of them are SERVING, because it is handed
their addresses. Shutdown is the reverse: the router drains first so no new work reaches an engine,
then engines and tokenizer drain in parallel. Every child runs in its own session with its log in
the run directory, and `pids.json` there names each child's pid and port (tests check that they
are all gone afterwards). The router reaches the tokenizer on a unix socket in the run directory
(`tokenizer.sock`; ClusterConfig.unix_sockets), beside the tokenizer's TCP port.

Imports no torch: the launcher only starts processes and speaks gRPC to them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from kvmesh.blocks import KV_CACHE_DTYPES
from kvmesh.procs import ServiceProcess, stop_all
from kvmesh.v1 import engine_pb2, engine_pb2_grpc


class LaunchError(RuntimeError):
    """A child failed to start or died; the message names it and its log file."""


@dataclass
class ClusterConfig:
    """What `kvmesh up` starts. Validate with `validate()`."""

    model: str = "demo"  # "demo" (built-in random model) or a HuggingFace checkpoint directory
    num_engines: int = 2
    device: str = "cpu"  # "cpu" or "cuda"
    load_format: str | None = None  # None = the engine's default; "dummy" = random weights, real shape
    run_dir: str | None = None  # logs and pids.json; None = a fresh temporary directory
    log_level: str = "INFO"
    startup_timeout_s: float = 600.0  # until every service is SERVING
    grace_s: float = 10.0  # drain time each service gets on shutdown
    gpus: list[str] | None = None  # with device "cuda": GPU ids handed out round-robin; None = detect
    engine_args: list[str] = field(default_factory=list)  # extra flags for every engine
    host: str = "127.0.0.1"  # where the router listens (the other services stay on loopback)
    port: int = 50051  # the router's gRPC port, `kvmesh generate`'s default; 0 = any free port
    http_port: int | None = None  # the router's OpenAI-compatible HTTP API; None = off, 0 = any free port
    router_workers: int = 1  # router processes on the router's port(s) (router/workers.py); 1 = one process
    # The router reaches the tokenizer on a unix socket in the run directory (the tokenizer's TCP port
    # stays for other clients); False = loopback TCP.
    unix_sockets: bool = True
    # Engine settings, as `vllm serve` spells them (None = the engine's default).
    dtype: str | None = None
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    gpu_memory_utilization: float | None = None
    kv_cache_memory: int | None = None  # bytes
    kv_cache_dtype: str | None = None  # auto | fp8 | fp8_e4m3 (e4m3 K/V: twice the blocks per byte)

    def engine_flags(self) -> list[str]:
        """The engine settings above as engine command-line flags."""
        flags = []
        for name in ("dtype", "max_model_len", "max_num_seqs", "gpu_memory_utilization", "kv_cache_memory",
                     "kv_cache_dtype"):
            value = getattr(self, name)
            if value is not None:
                flags += ["--" + name.replace("_", "-"), str(value)]
        return flags

    def validate(self) -> "ClusterConfig":
        if self.num_engines < 1:
            raise ValueError(f"num_engines={self.num_engines}: start at least one engine")
        if self.router_workers < 1:
            raise ValueError(f"router_workers={self.router_workers}: must be >= 1 (1 = one router process)")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r}: use cpu or cuda")
        if self.model != "demo" and not os.path.isfile(os.path.join(self.model, "config.json")):
            raise ValueError(f"model={self.model!r}: not a HuggingFace checkpoint directory (no config.json);"
                             " pass a directory with config.json, *.safetensors and tokenizer files, or 'demo'")
        if self.startup_timeout_s <= 0 or self.grace_s < 0:
            raise ValueError("startup_timeout_s must be > 0 and grace_s >= 0")
        for name in ("port", "http_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise ValueError(f"{name}={value}: use a port in [0, 65535] (0 = any free port)")
        if self.http_port and self.http_port == self.port:
            raise ValueError(f"http_port={self.http_port} is also the gRPC port: give the HTTP API its own")
        for name in ("max_model_len", "max_num_seqs", "kv_cache_memory"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value}: must be >= 1")
        if self.kv_cache_dtype is not None and self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r}: use one of {', '.join(KV_CACHE_DTYPES)}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization={self.gpu_memory_utilization}: must be in (0, 1]")
        return self


def detect_gpus() -> list[str]:
    """GPU ids visible to this process: CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`, else ["0"]."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [g for g in visible.split(",") if g]
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        lines = [line for line in out.splitlines() if line.startswith("GPU ")]
        if lines:
            return [str(i) for i in range(len(lines))]
    return ["0"]


def cuda_problem(python: str = sys.executable) -> str | None:
    """Why engines started by `python` could not use CUDA, or None when they can.

    Asked in a child interpreter: the launcher itself never imports torch.
    """
    code = "import sys, torch; print(torch.__version__); sys.exit(0 if torch.cuda.is_available() else 3)"
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"could not ask PyTorch about CUDA: {exc}"
    if out.returncode == 0:
        return None
    if out.returncode == 3:
        version = out.stdout.strip()
        hint = (" (a CPU build: rm -rf .venv && KVMESH_TORCH_SPEC=torch bash scripts/setup.sh)"
                if "+cpu" in version else " (check the driver with nvidia-smi)")
        return f"--device cuda, but PyTorch {version} sees no CUDA GPU{hint}"
    return f"PyTorch failed to import: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}"


_OTEL_CHOICES = ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                 "OTEL_SDK_DISABLED")


def tracing_env(name: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """OTEL_* settings for one child.

    With no exporter configured, tracing is off: the OTLP default would retry a collector that is
    not there and log a warning every few seconds. `service.instance.id` tells replicas apart.
    """
    environ = os.environ if environ is None else environ
    env = {}
    if not any(environ.get(k) for k in _OTEL_CHOICES):
        env["OTEL_TRACES_EXPORTER"] = "none"
    attrs = environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    if "service.instance.id=" not in attrs:
        env["OTEL_RESOURCE_ATTRIBUTES"] = ",".join(filter(None, [attrs, f"service.instance.id={name}"]))
    return env


# sun_path holds 108 bytes on Linux (104 on macOS), its terminating NUL included.
MAX_UNIX_SOCKET_PATH = 103


def tokenizer_socket(run_dir: str) -> str | None:
    """The tokenizer's unix socket in `run_dir`, or None where the path is too long for one."""
    path = os.path.join(os.path.abspath(run_dir), "tokenizer.sock")
    return path if len(path.encode()) <= MAX_UNIX_SOCKET_PATH else None


class LocalCluster:
    """A tokenizer, N engines and a router on 127.0.0.1, started and stopped as one.

    Use as a context manager, or call start() and stop(). `report` receives progress lines.
    """

    def __init__(self, config: ClusterConfig, report: Callable[[str], None] = print):
        self.config = config.validate()
        self.report = report
        self.run_dir = config.run_dir or tempfile.mkdtemp(prefix="kvmesh-up-")
        self.tokenizer: ServiceProcess | None = None
        self.engines: list[ServiceProcess] = []
        self.router: ServiceProcess | None = None
        self.http_port: int | None = None  # the HTTP API's bound port once started (with config.http_port)
        self._last_status: dict[str, tuple] = {}

    @property
    def services(self) -> list[ServiceProcess]:
        return [s for s in (self.tokenizer, *self.engines, self.router) if s is not None]

    @property
    def router_address(self) -> str:
        assert self.router is not None, "start() the cluster first"
        return self.router.address

    @property
    def http_url(self) -> str | None:
        """http://HOST:PORT of the router's OpenAI-compatible API (None when it is off)."""
        if self.http_port is None:
            return None
        return f"http://{self.router_address.rsplit(':', 1)[0]}:{self.http_port}"

    def __enter__(self) -> "LocalCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Start every service and return once all are SERVING.

        Raises:
            LaunchError when a child exits during startup; TimeoutError past startup_timeout_s.
            The caller stops the cluster (the context manager does).
        """
        cfg = self.config
        os.makedirs(self.run_dir, exist_ok=True)
        deadline = time.monotonic() + cfg.startup_timeout_s
        common = ["--log-level", cfg.log_level, "--grace", str(cfg.grace_s)]
        model = cfg.model if cfg.model == "demo" else os.path.abspath(cfg.model)
        socket_path = tokenizer_socket(self.run_dir) if cfg.unix_sockets else None
        if cfg.unix_sockets and socket_path is None:
            self.report("note: the run directory's path is too long for a unix socket; the router reaches the"
                        " tokenizer on loopback TCP (a shorter --run-dir avoids that)")
        unix_flags = ["--unix-socket", socket_path] if socket_path else []
        self.tokenizer = self._service("tokenizer", "tokenizer", ["--model", model, *common, *unix_flags])
        engine_flags = ["--model", model, "--device", cfg.device, *common, *cfg.engine_flags()]
        if cfg.load_format:
            engine_flags += ["--load-format", cfg.load_format]
        gpus = (cfg.gpus or detect_gpus()) if cfg.device == "cuda" else []
        if gpus and cfg.num_engines > len(gpus) and "KVMESH_GPU_MEMORY_UTILIZATION" not in os.environ:
            share = 0.9 / -(-cfg.num_engines // len(gpus))
            self.report(f"note: {cfg.num_engines} engines share {len(gpus)} GPU(s), and each engine takes 90% of"
                        f" its GPU by default: set KVMESH_GPU_MEMORY_UTILIZATION={share:.2f} (the engines read it)")
        if cfg.device == "cpu" and not {"OMP_NUM_THREADS", "KVMESH_CPU_THREADS"} & set(os.environ):
            # CPU engines share the cores instead of each starting one thread per core.
            engine_flags += ["--cpu-threads", str(max(1, (os.cpu_count() or 1) // cfg.num_engines))]
        for i in range(cfg.num_engines):
            env = {"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} if gpus else {}
            self.engines.append(self._service("engine", f"engine-{i}", [*engine_flags, *cfg.engine_args], env))
        # Popen from this (the main) thread: die_with_parent is tied to the starting thread.
        for s in (self.tokenizer, *self.engines):
            s.start()
        self._write_pids()
        self._show_started([self.tokenizer, *self.engines])
        self._wait_serving([self.tokenizer, *self.engines], deadline)

        engines = ",".join(e.address for e in self.engines)
        tokenizer = f"unix:{socket_path}" if socket_path else self.tokenizer.address
        router_flags = ["--tokenizer", tokenizer, "--engines", engines, *common]
        http_port_file = os.path.join(self.run_dir, "router-http.port")
        if cfg.http_port is not None:
            router_flags += ["--http-port", str(cfg.http_port), "--http-port-file", http_port_file]
        if cfg.router_workers > 1:
            router_flags += ["--workers", str(cfg.router_workers)]
        self.router = self._service("router", "router", router_flags)
        self.router.host, self.router.listen_port = cfg.host, cfg.port
        self.router.start()
        self._write_pids()
        self._show_started([self.router])
        self._wait_serving([self.router], deadline)
        if cfg.http_port is not None:
            with open(http_port_file) as f:  # written before the gRPC port file, so there by now
                self.http_port = int(f.read())

    def check_alive(self) -> None:
        """Raise LaunchError if any child has exited."""
        for s in self.services:
            try:
                s.check_alive()
            except RuntimeError as exc:
                raise LaunchError(str(exc)) from None

    def stop(self) -> dict[str, int | None]:
        """Drain and stop: the router first, then engines and tokenizer together. Idempotent.

        Returns:
            name -> exit code. A second Ctrl-C while draining kills the remaining children at once.
        """
        timeout = self.config.grace_s + 10.0  # drain, then interpreter and grpc shutdown
        codes: dict[str, int | None] = {}
        try:
            if self.router is not None:
                codes.update(stop_all([self.router], timeout))
            codes.update(stop_all([s for s in (self.tokenizer, *self.engines) if s is not None], timeout))
        except KeyboardInterrupt:
            self.report("second interrupt: killing the remaining children")
            for s in self.services:
                s.kill()
            codes.update({s.name: s.proc.returncode for s in self.services if s.proc is not None})
        return codes

    def log_tail(self, name: str, num_lines: int = 20) -> str:
        """The last lines of a child's log (for error messages)."""
        path = os.path.join(self.run_dir, f"{name}.log")
        try:
            with open(path, errors="replace") as f:
                return "".join(f.readlines()[-num_lines:])
        except OSError:
            return ""

    def _service(self, kind: str, name: str, args: list[str], env: dict[str, str] | None = None) -> ServiceProcess:
        env = {**tracing_env(name), **(env or {})}
        return ServiceProcess(kind=kind, name=name, args=args, env=env,
                              log_path=os.path.join(self.run_dir, f"{name}.log"), die_with_parent=True)

    def _write_pids(self) -> None:
        """pids.json: this launcher's pid and each started child's pid, port and log (atomically)."""
        data = {"launcher_pid": os.getpid(),
                "services": [{"name": s.name, "kind": s.kind, "pid": s.pid, "port": s.poll_port(),
                              "log": s.log_path} for s in self.services if s.proc is not None]}
        path = os.path.join(self.run_dir, "pids.json")
        with open(path + ".tmp", "w") as f:
            json.dump(data, f, indent=1)
        os.replace(path + ".tmp", path)

    def _show_started(self, services: list[ServiceProcess]) -> None:
        for s in services:
            self.report(f"  {s.name:<10} pid {s.pid:<7} log {s.log_path}")

    def _wait_serving(self, services: list[ServiceProcess], deadline: float) -> None:
        """Poll until every service is SERVING, showing engine startup phases as they change."""
        pending = list(services)
        channels: dict[str, grpc.Channel] = {}
        try:
            while pending:
                for s in list(pending):
                    try:
                        s.check_alive()
                    except RuntimeError as exc:
                        raise LaunchError(str(exc)) from None
                    if s.poll_port() is None:
                        continue
                    if s.name not in channels:
                        channels[s.name] = grpc.insecure_channel(s.address)
                        self._write_pids()  # now with the port
                    channel = channels[s.name]
                    if s.kind == "engine":
                        self._show_engine_status(s, channel)
                    if s.is_serving(channel, timeout_s=1.0):
                        if s.kind == "engine":  # READY and the startup breakdown, if the poll above missed it
                            self._show_engine_status(s, channel)
                        pending.remove(s)
                        self.report(f"  {s.name:<10} SERVING on {s.address}")
                if pending and time.monotonic() > deadline:
                    names = ", ".join(s.name for s in pending)
                    raise TimeoutError(f"{names} not SERVING within {self.config.startup_timeout_s:.0f}s;"
                                       f" logs in {self.run_dir}")
                if pending:
                    time.sleep(0.2)
        finally:
            for channel in channels.values():
                channel.close()

    def _show_engine_status(self, engine: ServiceProcess, channel: grpc.Channel) -> None:
        """Report an engine's startup phase when it changes (and progress in 25% steps)."""
        try:
            status = engine_pb2_grpc.EngineStub(channel).GetStatus(engine_pb2.GetStatusRequest(), timeout=1.0)
        except grpc.RpcError:
            return  # not answering yet (or an engine without GetStatus): health still gates
        phase = engine_pb2.EnginePhase.Name(status.phase).removeprefix("ENGINE_PHASE_")
        key = (phase, int(status.progress * 4))
        if self._last_status.get(engine.name) == key:
            return
        self._last_status[engine.name] = key
        line = f"  {engine.name:<10} {phase:<16}"
        if status.progress > 0:
            line += f" {status.progress:4.0%}"
        if status.detail:
            line += f"  {status.detail}"
        if phase == "READY" and status.phase_seconds:
            steps = ", ".join(f"{name.removeprefix('ENGINE_PHASE_').lower()} {seconds:.1f}s"
                              for name, seconds in sorted(status.phase_seconds.items(), key=_phase_order))
            line += f"  (startup {status.uptime_s:.1f}s: {steps})"
        self.report(line)


def _phase_order(item: tuple[str, float]) -> int:
    """Sort key for phase_seconds entries ("LOADING_WEIGHTS" or "ENGINE_PHASE_LOADING_WEIGHTS")."""
    name = "ENGINE_PHASE_" + item[0].removeprefix("ENGINE_PHASE_")
    return engine_pb2.EnginePhase.Value(name) if name in engine_pb2.EnginePhase.keys() else len(engine_pb2.EnginePhase.keys())
