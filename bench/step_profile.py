"""Where a step's time goes: per-step device time by kind of step, and the kernels of each kind.

    # GPU: the 8B shape, random weights (what issue 10's throughput and latency tables run)
    python3 bench/step_profile.py --device cuda --model bench/configs/llama3-8b --load-format dummy
    # CPU smoke (stories260k)
    python bench/step_profile.py --num-requests 24 --input-mean 24 --output-mean 16 --decode 4x48,1x32 \
        --mixed-decode 3 --mixed-prefill 32 --context 48

Two parts, one engine:
1. The issue's ShareGPT-like mix (bench/harness.py), all queued at t=0, with every launch bracketed
   by two CUDA events (cheap: no profiler). Steps are put in kinds: pure decode by batch size (1-7,
   8-31, 32-127, 128-255, 256+) and mixed (prefill tokens in the step). Per kind: steps, device ms
   per step (event to event: includes any wait for the host inside the step), host ms per launch,
   and the share of the run's wall time; the gap between one step's end and the next one's start
   event is the device idling between steps.
2. Steady states profiled with the torch profiler (CUDA activity only) and cProfile: decode windows
   (--decode BATCHxCONTEXT,...) and a mixed step of --mixed-decode decode rows at --context tokens
   plus a --mixed-prefill token prompt. Each: wall and device busy ms per step, the kernels by total
   device time, the host functions by own time. The mix also counts the Triton variants compiled
   while it ran (each a stall of seconds: there should be none).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import harness  # noqa: E402
from bench.throughput import busy_intervals_us, union_length  # noqa: E402
from engine_svc.core.request import FinishReason, Request  # noqa: E402
from engine_svc.sampling_params import SamplingParams  # noqa: E402

DECODE_KINDS = ((256, "decode B>=256"), (128, "decode B 128-255"), (32, "decode B 32-127"),
                (8, "decode B 8-31"), (1, "decode B 1-7"))


def step_kind(num_seqs: int, num_tokens: int) -> str:
    if num_tokens > num_seqs:
        return "mixed"
    return next(name for lo, name in DECODE_KINDS if num_seqs >= lo)


class LaunchRecorder:
    """Wraps runner.launch: (kind, host seconds, start event, end event) per launched step."""

    def __init__(self, runner, cuda: bool):
        import torch

        self.torch, self.cuda, self.records = torch, cuda, []
        self._launch = runner.launch
        runner.launch = self.launch

    def launch(self, plan):
        ev = self.torch.cuda.Event
        start = ev(enable_timing=True) if self.cuda else None
        if start is not None:
            start.record()
        t0 = time.perf_counter()
        pending = self._launch(plan)
        host = time.perf_counter() - t0
        end = ev(enable_timing=True) if self.cuda else None
        if end is not None:
            end.record()
        self.records.append((step_kind(len(plan.req_ids), sum(plan.num_new_tokens)), host, start, end))
        return pending


def triton_variants() -> set[str]:
    """Compiled variants of our Triton kernels so far, as "kernel: specialisation key" (one that
    appears during a timed run is a JIT stall; its key says which launch needed it)."""
    import kernels.activation, kernels.kv_cache, kernels.paged_attention_kernels, kernels.rms_norm, \
        kernels.rotary, kernels.sampling, kernels.sampling_penalties  # noqa: E401
    from triton.runtime.jit import JITFunction

    seen = set()
    for mod in (kernels.activation, kernels.kv_cache, kernels.paged_attention_kernels, kernels.rms_norm,
                kernels.rotary, kernels.sampling, kernels.sampling_penalties):
        for name, fn in vars(mod).items():
            if isinstance(fn, JITFunction):
                for entry in getattr(fn, "device_caches", {}).values():
                    seen.update(f"{name}: {key}" for key in entry[0])
    return seen


def mix_breakdown(core, work, temperature: float, device: str) -> dict:
    rec = LaunchRecorder(core.runner, device.startswith("cuda"))
    variants_before = triton_variants()
    harness.sync(device)
    t0 = time.perf_counter()
    for i, (prompt, n) in enumerate(work):
        core.add(Request(f"mix-{i}", prompt, SamplingParams(temperature=temperature, max_tokens=n, ignore_eos=True),
                         cache_salt="step-profile-mix"))
    harness.drain(core)
    harness.sync(device)
    wall_ms = (time.perf_counter() - t0) * 1e3
    kinds = collections.defaultdict(lambda: {"steps": 0, "device_ms": [], "host_ms": []})
    idle_ms = 0.0
    for i, (kind, host, start, end) in enumerate(rec.records):
        k = kinds[kind]
        k["steps"] += 1
        k["host_ms"].append(host * 1e3)
        if start is not None:
            k["device_ms"].append(start.elapsed_time(end))
            if i + 1 < len(rec.records):
                idle_ms += max(0.0, end.elapsed_time(rec.records[i + 1][2]))
    core.runner.launch = rec._launch
    out = {}
    for kind, k in sorted(kinds.items(), key=lambda kv: -sum(kv[1]["device_ms"] or kv[1]["host_ms"])):
        dev = k["device_ms"]
        out[kind] = {"steps": k["steps"],
                     "device_ms_median": round(statistics.median(dev), 3) if dev else None,
                     "device_ms_total": round(sum(dev), 1) if dev else None,
                     "share_of_wall": round(sum(dev) / wall_ms, 4) if dev else None,
                     "host_launch_ms_median": round(statistics.median(k["host_ms"]), 3)}
    return {"temperature": temperature, "wall_ms": round(wall_ms, 1), "steps": len(rec.records),
            "triton_variants_compiled_during_run": len(triton_variants() - variants_before),
            "variants_compiled_during_run": sorted(k[:1500] for k in triton_variants() - variants_before),
            "device_idle_between_steps_ms": round(idle_ms, 1), "kinds": out}


def kernel_table(prof, steps: int, top: int) -> list[dict]:
    """Device kernels by total time per step. Our Triton kernels (names starting with "_") are kept
    apart by launch grid too, so that the two attention launches of a mixed step (prefill tiles,
    indexed decode tiles) show separately; the grid comes from the profiler's trace export."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name)).get("traceEvents", [])
    by_key = collections.defaultdict(float)
    for e in events:
        if e.get("cat") != "kernel":
            continue
        name = e.get("name", "")[:90]
        grid = e.get("args", {}).get("grid")
        key = f"{name} grid={grid}" if name.startswith("_") and grid else name
        by_key[key] += float(e.get("dur", 0.0))
    rows = sorted(by_key.items(), key=lambda kv: -kv[1])[:top]
    return [{"kernel": name, "us_per_step": round(us / steps, 1)} for name, us in rows]


def host_profile(run, top: int) -> list[str]:
    """cProfile of one more window: the host functions by own time (where the CPU's step goes)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.runcall(run)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    return [line.rstrip() for line in text.getvalue().splitlines() if line.strip()][-top - 1:]


def profile_steps(core, device: str, steps: int, top: int, each_step=None) -> dict:
    """Time `steps` steps plainly, under the profiler (CUDA activity only), and under cProfile."""
    from torch.profiler import ProfilerActivity, profile

    def run():
        harness.sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            if each_step:
                each_step()
            core.step()
        harness.sync(device)
        return (time.perf_counter() - t0) * 1e3 / steps

    plain_ms = run()
    if not device.startswith("cuda"):
        return {"wall_ms_per_step": round(plain_ms, 3)}
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        profiled_ms = run()
    intervals = busy_intervals_us(prof)
    return {"wall_ms_per_step": round(plain_ms, 3), "profiled_wall_ms_per_step": round(profiled_ms, 3),
            "device_busy_ms_per_step": round(union_length(intervals) / steps / 1e3, 3),
            "kernels": kernel_table(prof, steps, top), "host_profile": host_profile(run, 2 * top)}


def steady_states(core, args, vocab: int) -> dict:
    import random

    rng = random.Random(7)

    def prompt(n):
        return [rng.randrange(harness.FIRST_ORDINARY_ID, vocab) for _ in range(n)]

    greedy = dict(temperature=args.temperature, ignore_eos=True)
    out = {}
    for spec in filter(None, args.decode.split(",")):
        batch, context = (int(x) for x in spec.split("x"))
        for i in range(batch):
            core.add(Request(f"dec-{i}", prompt(context), SamplingParams(max_tokens=10_000, **greedy)))
        while any(r.is_prefill for r in core.requests.values()):
            core.step()
        for _ in range(3):
            core.step()
        out[f"decode B={batch} ctx={context}"] = {"batch": batch, "context": context,
                                                   **profile_steps(core, args.device, args.steps, args.top)}
        core.abort_all(FinishReason.CANCELLED)
        harness.drain(core)
    for i in range(args.mixed_decode):
        core.add(Request(f"mixdec-{i}", prompt(args.context), SamplingParams(max_tokens=10_000, **greedy)))
    while any(r.is_prefill for r in core.requests.values()):
        core.step()
    counter = iter(range(10 ** 9))

    def add_prefill():  # one new prompt per step, finished after its first token: every step is mixed
        core.add(Request(f"pre-{next(counter)}", prompt(args.mixed_prefill), SamplingParams(max_tokens=1, **greedy)))

    for _ in range(3):
        add_prefill()
        core.step()
    out["mixed"] = {"decode_rows": args.mixed_decode, "prefill_tokens": args.mixed_prefill, "context": args.context,
                    **profile_steps(core, args.device, args.steps, args.top, add_prefill)}
    core.abort_all(FinishReason.CANCELLED)
    harness.drain(core)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_engine_args(p, **harness.GPU_ENGINE)
    harness.add_mix_args(p, num_requests=1000)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--decode", default="256x512,64x1024,16x2048,1x512",
                   help="steady decode windows, BATCHxCONTEXT, comma-separated")
    p.add_argument("--context", type=int, default=512, help="prompt tokens of the mixed window's decode rows")
    p.add_argument("--mixed-decode", type=int, default=200)
    p.add_argument("--mixed-prefill", type=int, default=512)
    p.add_argument("--steps", type=int, default=20, help="steps per steady-state window")
    p.add_argument("--top", type=int, default=14, help="kernels listed per window")
    p.add_argument("--skip-mix", action="store_true")
    p.add_argument("--no-list-singles", action="store_true",
                   help="A/B: mixed steps give their decode rows prefill tiles (the old path)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from engine_svc.engine_loop import build_engine_core
    from kvmesh.serving.heap import freeze_startup_heap

    if args.no_list_singles:
        import engine_svc.input_batch

        engine_svc.input_batch.MIN_LISTED_SINGLES = 1 << 30
    cfg = harness.engine_config(args, harness.effective_max_model_len(args))
    core, info = build_engine_core(cfg)
    freeze_startup_heap()  # as kvmesh-engine does once ready (kvmesh/serving/heap.py)
    work = harness.mix_from_args(args, info.vocab_size, core.max_model_len)
    report = {"config": {**harness.engine_settings(args, core, info), "list_singles": not args.no_list_singles}}
    if not args.skip_mix:
        harness.drain(core)
        report["mix"] = mix_breakdown(core, work, args.temperature, args.device)
        print(report["mix"], flush=True)
    report["steady"] = steady_states(core, args, info.vocab_size)
    report, paths = harness.save_report(f"step-profile-{info.name}", report, args.device, args.out)
    if "mix" in report:
        harness.print_table(["kind", "steps", "device ms", "total ms", "share", "host ms"],
                            [[k, v["steps"], v["device_ms_median"], v["device_ms_total"], v["share_of_wall"],
                              v["host_launch_ms_median"]] for k, v in report["mix"]["kinds"].items()],
                            title=f"mix: {report['mix']['wall_ms']} ms wall, {report['mix']['steps']} steps, "
                                  f"device idle between steps {report['mix']['device_idle_between_steps_ms']} ms")
    for name, s in report["steady"].items():
        print(f"{name}: wall {s['wall_ms_per_step']} ms/step, busy {s.get('device_busy_ms_per_step')} ms")
        for k in s.get("kernels", []):
            print(f"   {k['us_per_step']:>9.1f} us  {k['kernel']}")
        print("\n".join(s.get("host_profile", [])))
    print("wrote", ", ".join(paths))
    return report


if __name__ == "__main__":
    sys.exit(main() and 0)
