"""Garbage-collector pauses of the engine's host side over the ShareGPT-like mix, with the startup heap
frozen (kvmesh/serving/heap.py, as `kvmesh-engine` runs) and without, one child process each.

    python bench/gc_pauses.py [--num-requests 1000] [--out FILE]

The real EngineCore is stepped with bench/core_step.py's FakeRunner (no model: the scheduler's,
block manager's and outputs' objects only), with torch imported as in an engine process. Per
generation: collections, their total and longest pause (gc.callbacks), and the run's host seconds.
A full collection is a stall of the step loop: the GPU idles for as long as it takes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def child(num_requests: int, freeze: bool) -> dict:
    import gc

    import torch  # noqa: F401 -- an engine process has it loaded: part of the heap a full collection walks

    from bench.core_step import FakeRunner, _core
    from bench.harness import GPU_ENGINE, sharegpt_mix
    from engine_svc.core.request import Request
    from kvmesh.serving.heap import freeze_startup_heap
    from engine_svc.sampling_params import SamplingParams

    core = _core(FakeRunner(), num_blocks=32768, prefix=True, **GPU_ENGINE)
    work = sharegpt_mix(num_requests, 128256, 4096)
    if freeze:
        freeze_startup_heap()
    pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
    started = []

    def on_gc(phase, info):
        if phase == "start":
            started.append(time.perf_counter())
        else:
            pauses[info["generation"]].append(time.perf_counter() - started.pop())

    gc.callbacks.append(on_gc)
    t0 = time.perf_counter()
    for i, (prompt, n) in enumerate(work):
        core.add(Request(f"mix-{i}", prompt, SamplingParams(temperature=1.0, max_tokens=n, ignore_eos=True)))
    steps = 0
    while core.has_work:
        core.step()
        steps += 1
    host_s = time.perf_counter() - t0
    gc.callbacks.remove(on_gc)
    return {"frozen": freeze, "steps": steps, "host_s": round(host_s, 3),
            "generations": {str(g): {"collections": len(p), "total_ms": round(sum(p) * 1e3, 1),
                                     "max_ms": round(max(p, default=0.0) * 1e3, 2)} for g, p in pauses.items()}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--out", default=None)
    p.add_argument("--child", choices=["frozen", "unfrozen"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        run = child(args.num_requests, args.child == "frozen")
        print(json.dumps(run))
        return run
    from bench import harness

    runs = []
    for variant in ("unfrozen", "frozen"):
        proc = subprocess.run([sys.executable, __file__, "--child", variant, "--num-requests", str(args.num_requests)],
                              capture_output=True, text=True, check=True)
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    report = {"workload": {"num_requests": args.num_requests, "runner": "FakeRunner (bench/core_step.py)"},
              "host_load_avg_1m": round(os.getloadavg()[0], 2), "runs": runs,
              "note": "host CPU of this machine: the collections are the engine's, their pauses grow with the "
                      "heap (a GPU engine process holds more: CUDA graphs, Triton kernels)"}
    report, paths = harness.save_report("gc-pauses", report, "cpu", args.out)
    harness.print_table(["heap", "host s", "gen0 n / ms", "gen1 n / ms", "gen2 n / ms / max"],
                        [["frozen" if r["frozen"] else "unfrozen", r["host_s"],
                          *(f"{r['generations'][g]['collections']} / {r['generations'][g]['total_ms']}" for g in "01"),
                          f"{r['generations']['2']['collections']} / {r['generations']['2']['total_ms']} / "
                          f"{r['generations']['2']['max_ms']}"] for r in runs])
    print("wrote", ", ".join(paths))
    return report


if __name__ == "__main__":
    sys.exit(main() and 0)
