"""Replica-choice policies compared in one run: the same engines, the same seeded workload, one
router per policy in turn (kv, least_requests, round_robin).

    python bench/router.py --model ../shared/models/stories260k --out bench/results/router-<device>-<date>.json

Engines of unequal KV capacity (--blocks 96,48,24 by default) behind each router; requests arrive
as a seeded Poisson process with varied prompt and output lengths (ignore_eos, so every policy sees
the same token counts). Per policy: goodput (requests/s meeting the TTFT and time-per-output-token
SLOs, without error), output token throughput, TTFT p50/p99, errors, and which engine served what.
Also importable: bench/overhead.py uses `start_services`, `percentile` and `environment`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import json
import os
import pathlib
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field

import grpc

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# bench/ is sys.path[0] when run as a script, where this file would shadow the `router` package;
# nothing here imports it (routers run as child processes).
from bench.provenance import cpu_name, git_commit, write_report  # noqa: E402
from kvmesh.procs import ServiceProcess, stop_all  # noqa: E402
from kvmesh.serving.channels import create_channel  # noqa: E402
from kvmesh.v1 import common_pb2, engine_pb2, engine_pb2_grpc, router_pb2, router_pb2_grpc  # noqa: E402

POLICIES = ["kv", "least_requests", "round_robin"]
# One torch thread per engine (several engines share the CPU; spinning OpenMP threads would fight),
# no trace export without a collector.
CHILD_ENV = {"OMP_NUM_THREADS": "1", "OTEL_TRACES_EXPORTER": "none"}
PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom went to the park", "One day, a big bird",
           "There was a girl who loved to sing", "The sun was hot and the cat", "Sam had a red ball",
           "In a small house lived an old man who"]


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def environment() -> dict:
    """Device, date and git commit for a results file."""
    cpu, commit = cpu_name(), git_commit()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "router", "engine_svc", "tokenizer_svc"],
                                cwd=REPO, capture_output=True, text=True).stdout.strip())
    return {"device": f"cpu: {cpu} x{os.cpu_count()}", "date": datetime.datetime.now(datetime.timezone.utc)
            .isoformat(timespec="seconds"), "git_commit": commit, "git_dirty": dirty,
            "python": platform.python_version(),
            # A shared machine: other work running beside the benchmark shows here.
            "loadavg_1m_at_end": round(os.getloadavg()[0], 2)}


def start_services(model: str, blocks: list[int], log_dir: pathlib.Path) -> tuple[ServiceProcess, list[ServiceProcess]]:
    """A tokenizer and one engine per entry of `blocks` (its KV blocks), all healthy."""
    log_dir.mkdir(parents=True, exist_ok=True)
    tok = ServiceProcess("tokenizer", "tokenizer", ["--model", model], log_path=str(log_dir / "tokenizer.log"),
                         env=CHILD_ENV, die_with_parent=True).start()
    engines = [ServiceProcess("engine", f"engine-{i}", ["--model", model, "--num-gpu-blocks-override", str(b)],
                              log_path=str(log_dir / f"engine-{i}.log"), env=CHILD_ENV,
                              die_with_parent=True).start()
               for i, b in enumerate(blocks)]
    for proc in [tok, *engines]:
        proc.wait_healthy(300)
    return tok, engines


def start_router(tok: ServiceProcess, engines: list[ServiceProcess], log_dir: pathlib.Path, *flags: str) -> ServiceProcess:
    proc = ServiceProcess("router", f"router-{flags[1] if len(flags) > 1 else 'x'}",
                          ["--tokenizer", tok.address, "--engines", ",".join(e.address for e in engines),
                           "--log-level", "WARNING", *flags],
                          log_path=str(log_dir / "router.log"), env=CHILD_ENV, die_with_parent=True).start()
    proc.wait_healthy(120)
    return proc


async def wait_replicas(address: str, n: int, timeout_s: float = 60.0) -> None:
    async with create_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            models = await stub.ListModels(router_pb2.ListModelsRequest())
            if models.models and models.models[0].num_ready_replicas == n:
                return
            await asyncio.sleep(0.1)
    raise TimeoutError(f"router at {address} did not see {n} engines")


@dataclass(slots=True)
class Outcome:
    """One request as the client saw it."""

    sent_at: float
    first_at: float | None = None
    end_at: float | None = None
    num_tokens: int = 0
    engine_id: str = ""
    error: str = ""  # status name or StreamError reason; "" = success


@dataclass
class Workload:
    """A seeded Poisson arrival process of text requests (prompt sentences and output length drawn
    uniformly from the given ranges)."""

    name: str
    num_requests: int
    rate_rps: float
    sentences: tuple[int, int]  # prompt length in sentences of PROMPTS (about 6-8 tokens each)
    max_tokens: tuple[int, int]
    seed: int = 0
    requests: list = field(default_factory=list)  # (delay_s, RouterGenerateRequest)

    @classmethod
    def parse(cls, spec: str, seed: int) -> "Workload":
        """NAME:REQUESTS:RATE:SENT_MIN-SENT_MAX:TOK_MIN-TOK_MAX, e.g. short:160:16:1-6:16-96."""
        name, n, rate, sent, toks = spec.split(":")
        pair = lambda text: tuple(int(x) for x in text.split("-"))  # noqa: E731
        return cls(name, int(n), float(rate), pair(sent), pair(toks), seed).build()

    def build(self) -> "Workload":
        rng = random.Random(self.seed)
        t = 0.0
        for _ in range(self.num_requests):
            t += rng.expovariate(self.rate_rps)
            prompt = " ".join(rng.choice(PROMPTS) for _ in range(rng.randint(*self.sentences)))
            sampling = common_pb2.SamplingParams(temperature=0.0, ignore_eos=True,
                                                 max_tokens=rng.randint(*self.max_tokens))
            self.requests.append((t, router_pb2.RouterGenerateRequest(text=prompt, sampling=sampling,
                                                                      return_tokens=True)))
        return self

    def describe(self) -> dict:
        return {"requests": self.num_requests, "rate_rps": self.rate_rps, "prompt_sentences": list(self.sentences),
                "max_tokens": list(self.max_tokens), "arrivals": "poisson", "seed": self.seed,
                "ignore_eos": True, "temperature": 0.0}


async def _one(stub, req, delay_s: float, start: float, timeout_s: float) -> Outcome:
    await asyncio.sleep(max(0.0, start + delay_s - time.monotonic()))
    out = Outcome(sent_at=time.monotonic())
    try:
        async for resp in stub.Generate(req, timeout=timeout_s):
            if resp.engine_id:
                out.engine_id = resp.engine_id
            if resp.tokens and out.first_at is None:
                out.first_at = time.monotonic()
            out.num_tokens += len(resp.tokens)
            if resp.HasField("error"):
                out.error = common_pb2.ErrorReason.Name(resp.error.reason)
    except grpc.aio.AioRpcError as exc:
        out.error = exc.code().name
    out.end_at = time.monotonic()
    return out


async def run_workload(address: str, workload: Workload, timeout_s: float) -> tuple[list[Outcome], float]:
    async with create_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        start = time.monotonic()
        outcomes = await asyncio.gather(*(_one(stub, req, d, start, timeout_s) for d, req in workload.requests))
        return list(outcomes), time.monotonic() - start


def summarize(outcomes: list[Outcome], duration_s: float, slo_ttft_s: float, slo_tpot_s: float,
              engine_names: dict[str, str]) -> dict:
    ok = [o for o in outcomes if not o.error and o.first_at is not None]
    ttft = [o.first_at - o.sent_at for o in ok]
    tpot = [(o.end_at - o.first_at) / (o.num_tokens - 1) for o in ok if o.num_tokens > 1]
    good = [o for o in ok if o.first_at - o.sent_at <= slo_ttft_s
            and (o.num_tokens <= 1 or (o.end_at - o.first_at) / (o.num_tokens - 1) <= slo_tpot_s)]
    errors = collections.Counter(o.error for o in outcomes if o.error)
    assigned = collections.Counter(engine_names.get(o.engine_id, o.engine_id or "none") for o in outcomes)
    return {
        "requests": len(outcomes), "completed": len(ok), "errors": dict(errors), "duration_s": round(duration_s, 3),
        "goodput_rps": round(len(good) / duration_s, 3), "goodput_fraction": round(len(good) / len(outcomes), 3),
        "throughput_tok_s": round(sum(o.num_tokens for o in ok) / duration_s, 1),
        "ttft_p50_s": _r(percentile(ttft, 50)), "ttft_p99_s": _r(percentile(ttft, 99)),
        "tpot_p50_s": _r(percentile(tpot, 50)), "tpot_p99_s": _r(percentile(tpot, 99)),
        "assignments": dict(sorted(assigned.items())),
    }


MEDIAN_KEYS = ["goodput_rps", "goodput_fraction", "throughput_tok_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s",
               "tpot_p99_s"]


def median_summary(summaries: list[dict]) -> dict:
    """Per-metric medians over repeated runs (and the total of errors)."""
    out = {k: percentile([s[k] for s in summaries if s[k] is not None], 50) for k in MEDIAN_KEYS}
    out["errors"] = dict(sum((collections.Counter(s["errors"]) for s in summaries), collections.Counter()))
    return out


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


async def engine_ids(engines: list[ServiceProcess]) -> dict[str, str]:
    """engine_id (from GetLoad) -> our label, to name assignments."""
    names = {}
    for i, e in enumerate(engines):
        async with create_channel(e.address) as channel:
            load = await engine_pb2_grpc.EngineStub(channel).GetLoad(engine_pb2.GetLoadRequest())
            names[load.engine_id] = f"engine-{i} ({load.total_blocks} blocks)"
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO.parent / "shared" / "models" / "stories260k"))
    parser.add_argument("--blocks", default="96,48,24", help="KV blocks of each engine")
    parser.add_argument("--workload", action="append", default=None,
                        help="NAME:REQUESTS:RATE:SENT_MIN-SENT_MAX:TOK_MIN-TOK_MAX (repeatable); default: "
                             "short:160:16:1-6:16-96 and long:96:6:10-30:32-128 (KV-bound)")
    parser.add_argument("--slo-ttft", type=float, default=1.0, help="TTFT SLO in seconds (goodput)")
    parser.add_argument("--slo-tpot", type=float, default=0.1, help="time per output token SLO in seconds")
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request deadline in seconds")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--repeats", type=int, default=3, help="runs per policy (interleaved); medians reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the JSON results here")
    parser.add_argument("--log-dir", default="/tmp/kvmesh-bench-router")
    args = parser.parse_args()

    blocks = [int(b) for b in args.blocks.split(",")]
    specs = args.workload or ["short:160:16:1-6:16-96", "long:96:6:10-30:32-128"]
    workloads = [Workload.parse(spec, args.seed) for spec in specs]
    log_dir = pathlib.Path(args.log_dir)
    tok, engines = start_services(args.model, blocks, log_dir)
    policies = args.policies.split(",")
    runs: dict = {w.name: {p: [] for p in policies} for w in workloads}
    try:
        names = asyncio.run(engine_ids(engines))
        for rep in range(args.repeats):  # policies interleaved, so that drift in the machine hits all alike
            for policy in policies:
                router = start_router(tok, engines, log_dir, "--policy", policy)
                try:
                    asyncio.run(wait_replicas(router.address, len(engines)))
                    for w in workloads:
                        outcomes, duration = asyncio.run(run_workload(router.address, w, args.timeout))
                        runs[w.name][policy].append(
                            summarize(outcomes, duration, args.slo_ttft, args.slo_tpot, names))
                        print(rep, w.name, policy, json.dumps(runs[w.name][policy][-1]), flush=True)
                        time.sleep(1.0)  # let the engines drain between runs
                finally:
                    router.stop()
    finally:
        stop_all([tok, *engines])
    report = {"bench": "router", **environment(), "model": pathlib.Path(args.model).name,
              "engines_kv_blocks": blocks, "block_size": 16, "repeats": args.repeats,
              "slo": {"ttft_s": args.slo_ttft, "tpot_s": args.slo_tpot},
              "workloads": {w.name: {**w.describe(),
                                     "median": {p: median_summary(runs[w.name][p]) for p in policies},
                                     "runs": runs[w.name]} for w in workloads}}
    write_report(report, args.out)


if __name__ == "__main__":
    main()
