"""Host CPU of the whole engine-side path per step and per token, through a real engine server:
EngineCore.step -> the engine loop's hand-off to the event loop -> the Generate handler building
GenerateResponse messages -> gRPC, with a real model runner (stories260k by default) whose own
CPU time is measured and subtracted.

    python bench/engine_host.py                                 # this tree, batch 1, 64, 256
    python bench/engine_host.py --baseline fad957e --repeats 2  # that commit's engine_svc/ + kvmesh/ beside it
    python bench/engine_host.py --device cuda --model models/stories260k --baseline-dir DIR   # on the GPU

Each measurement is a fresh engine process (a worker: EngineServer in-process, TelemetryHooks as
`kvmesh-engine` has them, one torch thread on CPU) and a client process that opens `batch` Generate
streams at once (include_load, as the router sends them), greedy, ignore_eos, `--tokens` tokens
each, and reads them to the end. The worker reads, over the client's run:

  engine thread   CPU time of the engine loop's thread minus the runner's launch() and result()
                  (schedule, outputs, load snapshot, the per-step hand-off): "core us/step"
  event loop      CPU time of the event loop's thread (routing outputs to the streams, the
                  handlers, building responses, grpc's Python side): "loop us/token"
  other threads   the rest of the process (grpc's C-core threads, ...)
  runner          launch() + result() thread time (model work; on CUDA it includes the sync wait)

With --baseline REV both trees run alternately (--repeats times each; the lowest total per batch
is kept: noise on a shared machine only ever adds time). Greedy token digests must match.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import zlib

_ROOT = os.environ.get("KVMESH_HOST_ROOT")  # set by --baseline: import the engine from there
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)
if _ROOT:
    sys.path.insert(0, _ROOT)

BATCHES = (1, 64, 256)


# ---- the client process ----

async def _client(port: int, batch: int, tokens: int, prompt_len: int, vocab: int) -> dict:
    import grpc

    from kvmesh.v1 import common_pb2, engine_pb2, engine_pb2_grpc

    rng = random.Random(7)
    prompts = [[rng.randrange(1, vocab) for _ in range(prompt_len)] for _ in range(batch)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = engine_pb2_grpc.EngineStub(channel)

        async def one(i: int) -> tuple[list[int], int]:
            req = engine_pb2.GenerateRequest(
                request_id=f"h-{i}", prompt_token_ids=prompts[i], include_load=True,
                sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True))
            ids, messages, reason = [], 0, None
            async for resp in stub.Generate(req):
                messages += 1
                ids.extend(t.id for t in resp.tokens)
                reason = resp.finish_reason or reason
            assert reason == common_pb2.FINISH_REASON_LENGTH and len(ids) == tokens, (i, reason, len(ids))
            return ids, messages

        t0 = time.monotonic()
        results = await asyncio.gather(*(one(i) for i in range(batch)))
        wall = time.monotonic() - t0
    digest = hashlib.blake2b(repr([ids for ids, _ in results]).encode(), digest_size=8).hexdigest()
    return {"wall_s": wall, "messages": sum(m for _, m in results), "tokens": batch * tokens,
            "token_digest": digest}


# ---- the engine worker process ----

def _thread_cpu_s(thread: threading.Thread) -> float:
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def _timed_runner_factory(counter: list, args):
    """The runner (ModelRunner, or FakeRunner with --runner fake) with its launch() and the handle's
    result() adding their thread CPU ns to counter[0]."""
    if args.runner == "fake":
        base = FakeRunner
    else:
        from engine_svc.model_runner import ModelRunner as base

    class _TimedHandle:
        __slots__ = ("_handle",)

        def __init__(self, handle):
            self._handle = handle

        def result(self):
            t0 = time.thread_time_ns()
            try:
                return self._handle.result()
            finally:
                counter[0] += time.thread_time_ns() - t0

    class TimedRunner(base):
        def __init__(self, config):
            super().__init__(config, args.fake_step_ms / 1e3) if base is FakeRunner else super().__init__(config)

        def launch(self, plan):
            t0 = time.thread_time_ns()
            try:
                return _TimedHandle(super().launch(plan))
            finally:
                counter[0] += time.thread_time_ns() - t0

    return TimedRunner


class _GcTimer:
    """Collections per generation and the time they took, on every thread (gc.callbacks)."""

    def __init__(self):
        self.count, self.seconds, self._t0 = [0, 0, 0], [0.0, 0.0, 0.0], 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.count[info["generation"]] += 1
            self.seconds[info["generation"]] += time.perf_counter() - self._t0

    def snapshot(self) -> tuple[list, list]:
        return list(self.count), list(self.seconds)


class FakeRunner:
    """A model runner with no model (--runner fake): the host path alone, as behind a fast GPU.

    launch() keeps each row's position; result() sleeps --fake-step-ms (the GIL released, as while
    waiting for a device) and returns a token that depends only on (request, position)."""

    VOCAB = 32000

    def __init__(self, config, step_s: float = 0.0):
        self.config, self.step_s, self.rows = config, step_s, {}

    def load_model(self, on_progress=None):
        from engine_svc.step import ModelInfo

        return ModelInfo(name="fake", vocab_size=self.VOCAB, model_max_len=4096, eos_token_ids=[2], bos_token_id=1,
                         dtype="float32", num_layers=1, num_kv_heads=1, head_dim=1)

    def determine_num_blocks(self) -> int:
        return 65536

    def allocate_kv_cache(self, num_blocks: int) -> None:
        pass

    def warmup(self) -> None:
        pass

    def launch(self, plan):
        from engine_svc.step import SampledToken

        rows = self.rows
        for rid in plan.removed_ids:
            rows.pop(rid, None)
        for seq in plan.new_seqs:
            rows[seq.request_id] = [seq.start_pos, zlib.crc32(seq.request_id.encode())]
        results = []
        for rid, n, sample in zip(plan.req_ids, plan.num_new_tokens, plan.sample):
            row = rows[rid]
            row[0] += n
            results.append(SampledToken(3 + (row[1] * 1000003 + row[0] * 7919) % (self.VOCAB - 3)) if sample else None)
        return _FakeHandle(results, self.step_s)


class _FakeHandle:
    __slots__ = ("_results", "_step_s")

    def __init__(self, results: list, step_s: float):
        self._results, self._step_s = results, step_s

    def result(self) -> list:
        if self._step_s:
            time.sleep(self._step_s)
        return self._results


def _counting_hooks(model_name: str):
    from engine_svc.telemetry_hooks import TelemetryHooks

    class CountingHooks(TelemetryHooks):
        num_steps_seen = 0

        def on_step(self, info) -> None:
            self.num_steps_seen += 1
            super().on_step(info)

    return CountingHooks(model_name)


async def _worker(args) -> dict:
    from bench import harness
    from engine_svc.server import EngineServer

    if args.switch_interval_ms:
        sys.setswitchinterval(args.switch_interval_ms / 1e3)
    config = harness.engine_config(args, harness.effective_max_model_len(args))
    runner_ns = [0]
    hooks = _counting_hooks(os.path.basename(args.model.rstrip("/")))
    server = EngineServer(config, hooks=hooks, runner_factory=_timed_runner_factory(runner_ns, args))
    hooks.bind(server.service.engine_id, lambda: server.engine.load)
    server.freeze_gc = not os.environ.get("NOFREEZE")  # as `kvmesh-engine` sets it (a tree without it ignores it)
    port = await server.start()
    await server.startup()
    engine_thread = server.engine._thread
    client = [sys.executable, os.path.abspath(__file__), "--client", "--port", str(port), "--batch", str(args.batch),
              "--tokens", str(args.tokens), "--prompt-len", str(args.prompt_len),
              "--vocab", str(server.engine.info.vocab_size)]
    env = {k: v for k, v in os.environ.items() if k != "KVMESH_HOST_ROOT"}
    gc_timer = _GcTimer()
    steps0, runner0 = hooks.num_steps_seen, runner_ns[0]
    eng0, loop0, proc0, wall0 = _thread_cpu_s(engine_thread), time.thread_time(), time.process_time(), time.monotonic()
    proc = await asyncio.create_subprocess_exec(*client, stdout=asyncio.subprocess.PIPE, env=env)
    out, _ = await proc.communicate()
    assert proc.returncode == 0, "the client failed"
    wall = time.monotonic() - wall0
    eng, loop, total = _thread_cpu_s(engine_thread) - eng0, time.thread_time() - loop0, time.process_time() - proc0
    runner = (runner_ns[0] - runner0) / 1e9
    steps = hooks.num_steps_seen - steps0
    gc_count, gc_seconds = gc_timer.snapshot()
    await server.stop()
    seen = json.loads(out)
    n = seen["tokens"]
    return {"batch": args.batch, "tokens_per_request": args.tokens, "prompt_len": args.prompt_len,
            "steps": steps, "tokens": n, "messages": seen["messages"], "server_wall_s": round(wall, 4),
            "client_wall_s": round(seen["wall_s"], 4), "output_tok_per_s": round(n / seen["wall_s"], 1),
            "cpu_s": {"engine_thread_outside_runner": round(eng - runner, 4), "runner": round(runner, 4),
                      "event_loop": round(loop, 4), "other_threads": round(total - eng - loop, 4),
                      "process": round(total, 4)},
            "core_us_per_step": round((eng - runner) / steps * 1e6, 1),
            "loop_us_per_token": round(loop / n * 1e6, 2),
            "host_us_per_step": round((total - runner) / steps * 1e6, 1),
            "host_us_per_token": round((total - runner) / n * 1e6, 2),
            "gc": {"collections": gc_count, "wall_s": [round(x, 4) for x in gc_seconds]},
            "token_digest": seen["token_digest"]}


# ---- the driver ----

def _engine_flags(args) -> list[str]:
    """The engine flags (bench/harness.py add_engine_args) as given, for the worker."""
    flags = ["--model", args.model, "--device", args.device, "--dtype", args.dtype, "--load-format", args.load_format,
             "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
             "--block-size", str(args.block_size), "--gpu-memory-utilization", str(args.gpu_memory_utilization),
             "--mixed-graph-max-tokens", str(args.mixed_graph_max_tokens)]
    for flag, value in (("--max-model-len", args.max_model_len), ("--kv-cache-memory", args.kv_cache_memory),
                        ("--threads", args.threads)):
        if value:
            flags += [flag, str(value)]
    if args.enforce_eager:
        flags.append("--enforce-eager")
    if not args.enable_prefix_caching:
        flags.append("--no-enable-prefix-caching")
    return flags


def _run_worker(root: str | None, batch: int, args) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "KVMESH_HOST_ROOT"}
    if root:
        env["KVMESH_HOST_ROOT"] = root
    flags = ["--tokens", str(args.tokens), "--runner", args.runner, "--fake-step-ms", str(args.fake_step_ms),
             "--prompt-len", str(args.prompt_len), "--switch-interval-ms", str(args.switch_interval_ms),
             *_engine_flags(args)]
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", "--batch", str(batch),
                        "--json-out", f.name, *flags], env=env, check=True)
        return json.load(open(f.name))


def _best(runs: list[dict]) -> dict:
    assert len({r["token_digest"] for r in runs}) == 1, "greedy tokens differ between runs of one tree"
    return min(runs, key=lambda r: r["cpu_s"]["process"] - r["cpu_s"]["runner"])


def run(args) -> dict:
    sides = {"after": None}
    tmp = None
    if args.baseline_dir:  # the GPU machine: the tree travels without .git
        sides = {"before": os.path.abspath(args.baseline_dir), "after": None}
    elif args.baseline:
        tmp = tempfile.TemporaryDirectory()
        archive = subprocess.run(["git", "-C", _REPO, "archive", args.baseline, "engine_svc", "kvmesh"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp.name], input=archive, check=True)
        sides = {"before": tmp.name, "after": None}
    rows = []
    for batch in args.batches:
        runs = {side: [] for side in sides}
        for _ in range(args.repeats):
            for side, root in sides.items():
                runs[side].append(_run_worker(root, batch, args))
        row = {"batch": batch, **{side: _best(r) for side, r in runs.items()}}
        if "before" in row:
            b, a = row["before"], row["after"]
            row["host_us_per_token_ratio"] = round(b["host_us_per_token"] / a["host_us_per_token"], 2)
            row["same_tokens"] = b["token_digest"] == a["token_digest"]
        rows.append(row)
    if tmp is not None:
        tmp.cleanup()
    return {"baseline_commit": args.baseline, "baseline_dir": args.baseline_dir, "repeats": args.repeats,
            "runner": args.runner,
            "fake_step_ms": args.fake_step_ms if args.runner == "fake" else None,
            "model": args.model if args.runner == "model" else "fake", "cases": rows}


def _print(report: dict) -> None:
    from bench.harness import print_table

    def cells(r: dict) -> list:
        return [r["core_us_per_step"], r["loop_us_per_token"], r["host_us_per_step"], r["host_us_per_token"],
                round(r["messages"] / r["tokens"], 2), r["output_tok_per_s"]]

    head = ["core us/step", "loop us/tok", "host us/step", "host us/tok", "msgs/tok", "tok/s"]
    rows = []
    for case in report["cases"]:
        for side in ("before", "after"):
            if side in case:
                rows.append([case["batch"], side, *cells(case[side])])
    print_table(["batch", "tree", *head], rows,
                "engine host CPU outside the model runner (core: engine thread; host: whole process)")


def main() -> None:
    from bench import harness

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_engine_args(p)
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    p.add_argument("--tokens", type=int, default=128, help="tokens generated per request")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--runner", default="model", choices=["model", "fake"],
                   help="model: the real ModelRunner; fake: no model (the host path alone, as behind a fast GPU)")
    p.add_argument("--fake-step-ms", type=float, default=1.0, help="--runner fake: the device wait per step")
    p.add_argument("--switch-interval-ms", type=float, default=0, help="worker: sys.setswitchinterval (0 = as is)")
    p.add_argument("--baseline", default=None, help="a commit to compare against, side by side")
    p.add_argument("--baseline-dir", default=None,
                   help="instead of --baseline: a directory holding the baseline's engine_svc/ and kvmesh/ "
                        "(git archive REV engine_svc kvmesh | tar -x -C DIR), for a machine without .git")
    p.add_argument("--repeats", type=int, default=1, help="runs per tree and batch (the best is kept)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--json-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.client:
        print(json.dumps(asyncio.run(_client(args.port, args.batch, args.tokens, args.prompt_len, args.vocab))))
        return
    if args.worker:
        if args.device == "cpu" and not args.threads:
            args.threads = 1  # the model on the engine thread, where the runner's share is measured
        with open(args.json_out, "w") as f:
            json.dump(asyncio.run(_worker(args)), f)
        return
    report = run(args)
    report["note"] = ("host CPU of a real engine server outside the model runner's launch()/result(), over "
                      "batch streams of greedy tokens; thread CPU time on the measuring host")
    full, paths = harness.save_report("engine-host", report, args.device, args.out)
    _print(full)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
