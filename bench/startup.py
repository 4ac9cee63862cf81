"""Engine startup to SERVING, cold and warm, with the engine's own phase breakdown.

    # GPU: the 8B shape, random weights
    python3 bench/startup.py --device cuda --model bench/configs/llama3-8b --load-format dummy
    # CPU smoke (stories260k)
    python bench/startup.py --max-num-batched-tokens 256 --kv-cache-memory 16000000

Each run starts a real engine process (engine_svc.server, as `kvmesh up` does) and times, from the
spawn: listening (interpreter start and imports, until the port file appears), then SERVING on the
gRPC health service (engines turn SERVING after their warm-up generation). At SERVING it reads
GetStatus: the seconds of each phase the engine went through (LOADING_WEIGHTS, ALLOCATING_KV,
COMPILING, WARMING_UP); "before the tracker" is the spawn-to-SERVING time minus the engine's uptime.

- cold: every compiler cache points at a new empty directory (TRITON_CACHE_DIR,
  TORCHINDUCTOR_CACHE_DIR, CUDA_CACHE_PATH, XDG_CACHE_HOME), so Triton kernels and CUDA PTX are
  compiled from scratch;
- warm (--warm-runs times): the same directories again, now filled by the cold run: what a restart
  on the same machine costs. The OS page cache is warm in both (no weights are read: dummy load).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grpc  # noqa: E402

from bench import harness  # noqa: E402
from bench.router import CHILD_ENV  # noqa: E402
from kvmesh.procs import ServiceProcess  # noqa: E402
from kvmesh.v1 import engine_pb2, engine_pb2_grpc  # noqa: E402

PHASES = ["LOADING_WEIGHTS", "ALLOCATING_KV", "COMPILING", "WARMING_UP"]
CACHE_VARIABLES = {"TRITON_CACHE_DIR": "triton", "TORCHINDUCTOR_CACHE_DIR": "inductor",
                   "CUDA_CACHE_PATH": "cuda", "XDG_CACHE_HOME": "xdg"}


def cache_env(cache_root: pathlib.Path) -> dict[str, str]:
    env = {}
    for variable, sub in CACHE_VARIABLES.items():
        (cache_root / sub).mkdir(parents=True, exist_ok=True)
        env[variable] = str(cache_root / sub)
    return env


def wait_serving(proc: ServiceProcess, timeout_s: float) -> engine_pb2.EngineStatus:
    """Poll health until SERVING; return GetStatus then (phase seconds of the whole startup)."""
    deadline = time.monotonic() + timeout_s
    proc.wait_listening(timeout_s)
    with grpc.insecure_channel(proc.address) as channel:
        while time.monotonic() < deadline:
            proc.check_alive()
            if proc.is_serving(channel):
                return engine_pb2_grpc.EngineStub(channel).GetStatus(engine_pb2.GetStatusRequest(), timeout=10)
            time.sleep(0.05)
    raise TimeoutError(f"engine not SERVING within {timeout_s:.0f}s")


def one_start(args: argparse.Namespace, cache_root: pathlib.Path, log_path: pathlib.Path) -> dict:
    proc = ServiceProcess("engine", "engine", harness.engine_server_flags(args), log_path=str(log_path),
                          env={**CHILD_ENV, **cache_env(cache_root)}, die_with_parent=True)
    start = time.monotonic()
    proc.start()
    try:
        proc.wait_listening(args.startup_timeout)
        listening = time.monotonic() - start
        status = wait_serving(proc, args.startup_timeout)
        serving = time.monotonic() - start
    finally:
        proc.stop()
    phases = {name.removeprefix("ENGINE_PHASE_"): round(s, 3) for name, s in status.phase_seconds.items()}
    return {"to_serving_s": round(serving, 3), "to_listening_s": round(listening, 3),
            "before_tracker_s": round(serving - status.uptime_s, 3), "phase_seconds": phases}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_engine_args(p, **harness.GPU_ENGINE)
    p.add_argument("--warm-runs", type=int, default=1)
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--log-dir", default=None, help="the engines' logs (default: a temporary directory)")
    args = p.parse_args(argv)
    args.max_model_len = harness.effective_max_model_len(args)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="kvmesh-bench-startup-") as scratch:
        cache_root = pathlib.Path(scratch) / "caches"  # empty: the cold run fills it
        log_dir = pathlib.Path(args.log_dir or scratch)
        log_dir.mkdir(parents=True, exist_ok=True)
        runs["cold"] = one_start(args, cache_root, log_dir / "engine-cold.log")
        print("cold", runs["cold"], flush=True)
        for i in range(args.warm_runs):
            runs[f"warm_{i + 1}" if args.warm_runs > 1 else "warm"] = r = one_start(
                args, cache_root, log_dir / f"engine-warm-{i + 1}.log")
            print("warm", r, flush=True)
    report = {"config": {"model": pathlib.Path(args.model).name, "engine_flags": harness.engine_server_flags(args),
                         "cache_variables": sorted(CACHE_VARIABLES)},
              "results": runs}
    name = f"startup-{pathlib.Path(args.model).name}"
    report, paths = harness.save_report(name, report, args.device, args.out)
    harness.print_table(
        ["run", "to SERVING s", "listening s", "before tracker s", *(p.lower() + " s" for p in PHASES)],
        [[run, r["to_serving_s"], r["to_listening_s"], r["before_tracker_s"],
          *(r["phase_seconds"].get(p) for p in PHASES)] for run, r in runs.items()],
        title=f"startup: {report['config']['model']}, {report['device']}; wrote {', '.join(paths)}")
    return report


if __name__ == "__main__":
    sys.exit(main() and 0)
