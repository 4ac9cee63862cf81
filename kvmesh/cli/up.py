"""`kvmesh up`: a whole local cluster (tokenizer, N engines, router) on loopback, one command.

Starts the services in health-gated order (kvmesh.launcher), prints the router address, streams one
sample generation through the router with the same client code as `kvmesh generate`, then stays up
until Ctrl-C (or SIGTERM) and drains and stops every child. `--once` stops after the sample.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import sys
import time

from kvmesh.blocks import KV_CACHE_DTYPES
from kvmesh.launcher import ClusterConfig, LaunchError, LocalCluster, cuda_problem, tracing_env

DEFAULT_PROMPT = "The capital of France is"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "up", help="run a local cluster (tokenizer, engines, router) and answer a sample generation",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo",
                   help="'demo' (built-in tiny model with random weights) or a HuggingFace checkpoint directory")
    p.add_argument("--num-engines", type=int, default=2, help="engine replicas to start")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the engines run")
    p.add_argument("--gpus", default=None,
                   help="with --device cuda: GPU ids handed to engines round-robin, e.g. 0,1 (default: all visible)")
    p.add_argument("--load-format", default=None,
                   help="engine weight loading; dummy = random weights in the checkpoint's shape")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="text of the sample generation")
    p.add_argument("--max-tokens", type=int, default=24, help="length of the sample generation")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of the sample (0 = greedy)")
    p.add_argument("--once", action="store_true",
                   help="stop the cluster after the sample generation (smoke tests, CI)")
    p.add_argument("--run-dir", default=None, help="directory for child logs and pids.json (default: a new temp dir)")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds until every service must be SERVING")
    p.add_argument("--grace", type=float, default=10.0, help="seconds each service gets to drain on shutdown")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper,
                   help="log level of the services (their logs go to the run dir)")
    r = p.add_argument_group("router (the public endpoint)")
    r.add_argument("--host", default="127.0.0.1",
                   help="address the router listens on (0.0.0.0 = every interface); the rest stays on loopback")
    r.add_argument("--port", type=int, default=50051,
                   help="router gRPC port, the default of `kvmesh generate --router`; 0 = any free port")
    r.add_argument("--http-port", type=int, default=None,
                   help="also serve the OpenAI-compatible HTTP API on this port (e.g. 8000); off when absent")
    r.add_argument("--router-workers", type=int, default=1,
                   help="router processes sharing its port(s), each with its own event loop (the router's --workers)")
    r.add_argument("--unix-sockets", action=argparse.BooleanOptionalAction, default=True,
                   help="the router reaches the tokenizer on a unix socket in the run directory (--no-unix-sockets:"
                        " loopback TCP)")
    e = p.add_argument_group("engines (as `vllm serve` spells them; absent = the engine's default)")
    e.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                   help="weight and activation dtype")
    e.add_argument("--max-model-len", type=int, default=None, help="longest prompt + output in tokens")
    e.add_argument("--max-num-seqs", type=int, default=None, help="most sequences in one engine step")
    e.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="with --device cuda: share of each GPU an engine may use (weights + KV cache)")
    e.add_argument("--kv-cache-memory", type=int, default=None, metavar="BYTES",
                   help="bytes of KV cache per engine (instead of --gpu-memory-utilization; CPU default 256 MiB)")
    e.add_argument("--kv-cache-dtype", default=None, choices=list(KV_CACHE_DTYPES),
                   help="KV cache element type: auto = the model's dtype; fp8 = e4m3 (twice the blocks per byte)")


def run(args: argparse.Namespace) -> int:
    try:
        config = ClusterConfig(
            model=args.model, num_engines=args.num_engines, device=args.device, load_format=args.load_format,
            run_dir=args.run_dir, log_level=args.log_level, startup_timeout_s=args.startup_timeout,
            grace_s=args.grace, gpus=args.gpus.split(",") if args.gpus else None, host=args.host, port=args.port,
            http_port=args.http_port, router_workers=args.router_workers, unix_sockets=args.unix_sockets,
            dtype=args.dtype, max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs, gpu_memory_utilization=args.gpu_memory_utilization,
            kv_cache_memory=args.kv_cache_memory, kv_cache_dtype=args.kv_cache_dtype).validate()
    except ValueError as exc:
        print(f"kvmesh up: {exc}", file=sys.stderr)
        return 2
    for name, port in (("--port", config.port), ("--http-port", config.http_port)):
        if port and (problem := _port_taken(config.host, port)):
            print(f"kvmesh up: {name} {port}: {problem} (another `kvmesh up`?); pass {name} N, or {name} 0 for any"
                  " free port", file=sys.stderr)
            return 2
    if config.device == "cuda" and (problem := cuda_problem()):
        print(f"kvmesh up: {problem}", file=sys.stderr)
        return 2
    cluster = LocalCluster(config, report=_say)
    # Ctrl-C, SIGTERM and a closed terminal all take the same clean shutdown. SIGINT explicitly too: a
    # shell starts background jobs with SIGINT ignored, and `kill -INT` must still stop the cluster.
    _raise_interrupt_on(signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    rc = 0
    try:
        workers = f", router in {config.router_workers} processes" if config.router_workers > 1 else ""
        _say(f"kvmesh up: {config.num_engines} engine(s) on {config.device}, model {config.model}{workers}")
        _say(f"run directory {cluster.run_dir} (logs, pids.json)")
        if "OTEL_TRACES_EXPORTER" in tracing_env(""):
            _say("traces: off (set OTEL_EXPORTER_OTLP_ENDPOINT=http://HOST:4317 to export them)")
        cluster.start()
        _say(f"router listening on {cluster.router_address}")
        router_flag = "" if cluster.router_address == "127.0.0.1:50051" else f" --router {cluster.router_address}"
        _say(f"try: {_kvmesh_command()} generate{router_flag} --prompt \"Hello\"")
        if cluster.http_url:
            _say(f"OpenAI-compatible API on {cluster.http_url}/v1; try: curl "
                 f"{cluster.http_url}/v1/completions -d '{{\"prompt\": \"Hello\", \"max_tokens\": 16}}'")
        if config.model == "demo":
            _say("sample generation from the demo model: its weights are random, so the text is noise"
                 " (serve a real checkpoint with --model DIR)")
        elif config.load_format == "dummy":
            _say("sample generation with --load-format dummy: the weights are random, so the text is noise")
        _sample(cluster.router_address, args, run_dir=cluster.run_dir)
        if args.once:
            return 0
        _say(f"cluster is up: router {cluster.router_address}, logs in {cluster.run_dir}; Ctrl-C to stop")
        while True:
            cluster.check_alive()
            time.sleep(0.5)
    except KeyboardInterrupt:
        _say("\nstopping: draining the router, then engines and tokenizer")
    except (LaunchError, TimeoutError) as exc:
        _say(f"kvmesh up: {exc}")
        for s in cluster.services:
            if s.proc is not None and s.proc.poll() is not None:
                _say(f"--- last lines of {s.log_path} ---\n{cluster.log_tail(s.name).rstrip()}")
        rc = 1
    finally:
        codes = cluster.stop()
        if codes:
            _say("stopped: " + ", ".join(f"{name} (exit {code})" for name, code in codes.items()))
    return rc


def _sample(router: str, args: argparse.Namespace, run_dir: str) -> None:
    """Stream one generation through the router: literally `kvmesh generate` (same parser, same client).

    Raises:
        LaunchError when the generation fails (its status is already printed on stderr).
    """
    from kvmesh.cli.generate import EXIT_INTERRUPTED
    from kvmesh.cli.main import main as kvmesh_main

    _say(f"prompt: {args.prompt!r}")
    # --model "": the router's only model (an exported KVMESH_MODEL is a path, not a model name).
    rc = kvmesh_main(["generate", "--router", router, "--model", "", "--prompt", args.prompt,
                      "--max-tokens", str(args.max_tokens), "--temperature", str(args.temperature),
                      "--timeout", "300"])
    if rc == EXIT_INTERRUPTED:
        raise KeyboardInterrupt
    if rc != 0:
        raise LaunchError(f"the sample generation failed (exit {rc}); service logs in {run_dir}")
    _say("sample generation done")


def _port_taken(host: str, port: int) -> str | None:
    """Why `port` cannot be bound on `host` now (None when it can)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc.strerror.lower() if exc.strerror else str(exc)
    return None


def _kvmesh_command() -> str:
    """How the user can run `kvmesh` again: the name when it is on PATH, else this script's path."""
    script = sys.argv[0]
    if os.path.basename(script) == "kvmesh" and shutil.which("kvmesh") != os.path.abspath(script):
        return os.path.relpath(script) if not os.path.relpath(script).startswith("..") else script
    return "kvmesh"


def _say(line: str) -> None:
    print(line, flush=True)


def _raise_interrupt_on(*signals: signal.Signals) -> None:
    def handler(signum, frame):
        raise KeyboardInterrupt
    for sig in signals:
        signal.signal(sig, handler)
