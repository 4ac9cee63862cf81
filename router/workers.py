"""`python -m router.server --workers N`: N router processes serving one public port (vLLM's
`--api-server-count`, uvicorn's and gunicorn's `--workers`).

Why: one router's event loop is one thread, and at many concurrent streams it is saturated by
grpc's sends (one `sendmsg` per client response), not by Python work
(bench/profiles/event-loop-and-floor.md). N processes give the client side N threads.

How:
- Ports. This parent reserves the gRPC port (and the HTTP front's, with --http-port) with
  kvmesh.serving.reuseport.reserve_port: a port taken by another server still fails at once (exit
  2), port 0 resolves here to one port for all. Each worker binds it with SO_REUSEPORT and the kernel
  spreads new connections over the workers' listening sockets (a connection, and so each HTTP/2
  channel, stays with the worker that accepted it).
- Readiness. A worker binds only once its tokenizer answered and an engine is admissible
  (Router.start(listen_when_ready=True)); it then writes its ready file, and the parent writes
  --port-file (and --http-port-file) once every worker is ready: `kvmesh up` and tests that poll the
  port file, then health, see a router whose every worker can answer. Health is each worker's own
  (a Check reaches whichever worker holds the connection); each follows its engines.
- Each worker is a whole router: its own engine watchers and shared GenerateStreams, its own
  tokenizer streams, pending-block ledger, prefix index and limits. Limits are per worker:
  --max-concurrent-streams N means N streams per worker.
- A worker that exits (crash, kill -9) fails the router as a whole: the parent logs which worker
  and how, drains the others and exits 1, so that the supervisor (`kvmesh up`, Kubernetes, systemd)
  sees the failure and restarts the router, as vLLM does when one of its API server processes dies.
  No silent in-place restart: a crash loop would otherwise hide behind a healthy port.
- Shutdown: SIGTERM (or SIGINT) to the parent sends SIGTERM to every worker; each drains as a single
  router does (NOT_SERVING, in-flight streams get --grace); the parent exits once all have, killing
  a worker still there --grace + 10 s later. Workers die with the parent (PR_SET_PDEATHSIG), even
  when it is killed with SIGKILL, and stay in its process group (a launcher that kills the router's
  group kills them too; Ctrl-C in a terminal reaches each, and each drains).
- Metrics. With --metrics-port the parent serves one /metrics over every worker's
  (prometheus_client's multiprocess mode: each worker writes its values to files in a directory the
  parent owns): counters and histograms summed over the workers; the report-age gauge as last set by
  any worker.

Herding. Every worker reads the same engine load reports, and each counts as pending only the blocks
it sent itself (router.pending): between an engine's report and the next one that reaches a worker,
that worker does not see what the other workers sent there. The next report arrives within the
engine's change-driven report interval (WatchLoad pushes a report when the load changes, at most
one per RouterConfig.min_report_interval_ms, 20 ms, plus one transit), and every first response of
a worker's own request carries one. So the
blocks the workers together send an engine beyond what a single router would is at most what the
other N-1 workers dispatch to it within one report interval, never more than each worker's own
admission limit (free + cached - reserved - waiting - its own pending blocks, with --queue-ratio's
queueing allowance); what does not fit waits in the engine's queue (it is never lost or failed), and
the next report corrects every worker. vLLM's and SGLang's API-server processes share no state
either. With one worker this is today's single router, unchanged.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import tempfile
import time

from kvmesh.procs import ServiceProcess, stop_all
from kvmesh.serving.reuseport import reserve_port
from kvmesh.serving.server import write_port_file
from router.config import ConfigError

log = logging.getLogger("router.workers")

POLL_S = 0.1  # how often the parent looks at its workers
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def add_worker_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=1,
                        help="router processes serving the same --port (and --http-port) via SO_REUSEPORT, "
                             "each with its own engine and tokenizer streams (1 = this process serves)")
    # Set by the parent on each worker's command line, never by hand.
    parser.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-dir", default=None, help=argparse.SUPPRESS)


def check_worker_flags(args: argparse.Namespace) -> None:
    if args.workers < 1:
        raise ConfigError(f"workers={args.workers}: must be >= 1 (1 = one router process)")


def is_worker(args: argparse.Namespace) -> bool:
    return args.worker_index is not None


def worker_log_prefix(args: argparse.Namespace) -> str:
    return f"[worker {args.worker_index}] " if is_worker(args) else ""


def worker_ready_file(args: argparse.Namespace) -> str:
    """Where a worker writes its bound port once it serves (the parent waits for it)."""
    return _ready_path(args.worker_dir, args.worker_index)


def _ready_path(workdir: str, index: int) -> str:
    return os.path.join(workdir, f"worker-{index}.ready")


def serve_workers(args: argparse.Namespace, argv: list[str]) -> int:
    """Run args.workers routers on args.port until SIGTERM/SIGINT (exit 0) or a worker exits (exit 1).

    Raises:
        PortTaken when the gRPC or HTTP port is held by another server (nothing was started).
    """
    holders = [reserve_port(args.host, args.port)]
    port = holders[0].getsockname()[1]
    http_port = None
    workdir = tempfile.mkdtemp(prefix="kvmesh-router-workers-")
    metrics_dir = os.path.join(workdir, "metrics")
    os.mkdir(metrics_dir)
    metrics_server = None
    stopping: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stopping.append(signum))
    workers: list[ServiceProcess] = []
    try:
        if args.http_port is not None:
            holders.append(reserve_port(args.http_host or args.host, args.http_port))
            http_port = holders[-1].getsockname()[1]
        if args.metrics_port is not None:
            metrics_server = _serve_metrics(args.metrics_port, args.host, metrics_dir)
        # The worker's own flags go last: argparse keeps an option's last value.
        own = ["--port", str(port), "--workers", "1", "--worker-dir", workdir]
        if http_port is not None:
            own += ["--http-port", str(http_port)]
        for i in range(args.workers):
            workers.append(ServiceProcess("router", f"worker-{i}", [*argv, *own, "--worker-index", str(i)],
                                          env={MULTIPROC_ENV: metrics_dir}, host=args.host, listen_port=port,
                                          die_with_parent=True, new_session=False).start())
        log.info("%d workers starting on %s:%d", len(workers), args.host, port)
        if not _wait_ready(workers, workdir, stopping):
            return _stop(workers, args.grace, rc=0 if stopping else 1)
        if http_port is not None:
            write_port_file(args.http_port_file, http_port)
        write_port_file(args.port_file, port)
        log.info("%d workers serving on %s:%d%s", len(workers), args.host, port,
                 f" (HTTP on {http_port})" if http_port is not None else "")
        while not stopping:
            if (dead := _first_dead(workers)) is not None:
                log.error("%s exited with code %s: stopping the other workers; the router exits 1 (restart it)",
                          dead.name, dead.proc.returncode)
                return _stop(workers, args.grace, rc=1)
            time.sleep(POLL_S)
        log.info("signal %d: draining %d workers (grace %.1fs)", stopping[0], len(workers), args.grace)
        return _stop(workers, args.grace, rc=0)
    finally:
        stop_all(workers, timeout_s=args.grace + 10.0)  # no-op for workers already reaped
        if metrics_server is not None:
            metrics_server.shutdown()
        for sock in holders:
            sock.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_ready(workers: list[ServiceProcess], workdir: str, stopping: list[int]) -> bool:
    """Wait until every worker wrote its ready file. False when a signal came or a worker exited first."""
    pending = set(range(len(workers)))  # worker i is workers[i], started with --worker-index i
    while pending:
        if stopping:
            return False
        if (dead := _first_dead(workers)) is not None:
            log.error("%s exited with code %s while starting", dead.name, dead.proc.returncode)
            return False
        pending = {i for i in pending if not os.path.exists(_ready_path(workdir, i))}
        time.sleep(POLL_S)
    return True


def _first_dead(workers: list[ServiceProcess]) -> ServiceProcess | None:
    return next((w for w in workers if w.proc is not None and w.proc.poll() is not None), None)


def _stop(workers: list[ServiceProcess], grace_s: float, rc: int) -> int:
    """SIGTERM every worker (each drains for grace_s), SIGKILL any still there after grace_s + 10 s."""
    codes = stop_all(workers, timeout_s=grace_s + 10.0)
    odd = {name: code for name, code in codes.items() if code not in (0, None)}
    if odd and rc == 0:
        log.warning("workers that did not exit cleanly: %s", odd)
    return rc


def _serve_metrics(port: int, host: str, metrics_dir: str):
    """One /metrics over every worker's multiprocess files. Returns the HTTP server (shutdown() it)."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=metrics_dir)
    server, _thread = start_http_server(port, addr=host, registry=registry)
    log.info("metrics of all workers on %s:%d/metrics", host, server.server_port)
    return server
