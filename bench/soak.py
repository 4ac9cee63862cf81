"""Soak: a real mesh under a mixed, hostile load for minutes, with an engine killed and a router
restarted half way; every accepted request must end with a full result or a clear status, no
process may grow, and the engines' blocks must all come back.

    python bench/soak.py --model ../shared/models/stories260k --duration 600 \\
        --out bench/results/soak-cpu-<date>.json
    python bench/soak.py --duration 60 --out /tmp/soak.json      # the quick mode used to develop it

A tokenizer, two engines of unequal KV size and a router run as real processes on loopback. A few
client loops send requests back to back until the time is up: text or token-id prompts of mixed
lengths, output lengths from 1 to 256, greedy and seeded sampling, stop strings; some are cancelled
at a random point, some get a short deadline. At 1/3 of the run one engine is killed with SIGKILL
and restarted on its port; at 1/2 the router is stopped (SIGTERM, drain) and started again on its
port. Every process's RSS is sampled all along. At the end the load stops and the engines must
report every block free (cached prefix blocks count as free).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import pathlib
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field

import grpc

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.router import environment  # noqa: E402
from kvmesh.procs import ServiceProcess, stop_all  # noqa: E402
from kvmesh.serving.channels import create_channel  # noqa: E402
from kvmesh.v1 import common_pb2, engine_pb2, engine_pb2_grpc, router_pb2, router_pb2_grpc  # noqa: E402

CHILD_ENV = {"OMP_NUM_THREADS": "1", "OTEL_TRACES_EXPORTER": "none"}
ENGINE_BLOCKS = (64, 40)  # unequal on purpose; 40 blocks = 640 tokens hold one max-length sequence
WORDS = ("Once upon a time there was a little girl named Lily who loved to play in the park with her dog "
         "and one day the sun was hot so they went to the big tree and sat down to eat").split()
STOPS = (".", " the", "Lily", "!", " and")
# Statuses a client may see: documented in protos/kvmesh/v1/router.proto (CANCELLED and
# DEADLINE_EXCEEDED are the client's own doing; UNAVAILABLE while the router restarts).
EXPECTED_STATUSES = {"CANCELLED", "DEADLINE_EXCEEDED", "UNAVAILABLE", "RESOURCE_EXHAUSTED"}


@dataclass
class Tally:
    """Every request's end, by kind. accepted == sum of the rest, or requests were lost."""

    accepted: int = 0
    completed: int = 0  # a finish reason STOP_TOKEN / STOP_STRING / LENGTH
    ends: collections.Counter = field(default_factory=collections.Counter)  # "finish:LENGTH", "status:...", ...
    lost: int = 0  # a stream that ended with neither a finish reason nor a status
    unexpected: list = field(default_factory=list)  # the first few unexpected statuses, with details

    def end(self, kind: str, detail: str = "") -> None:
        self.ends[kind] += 1
        if kind.startswith("status:") and kind[7:] not in EXPECTED_STATUSES and len(self.unexpected) < 20:
            self.unexpected.append(f"{kind}: {detail}")


def random_request(rng: random.Random, vocab: int) -> router_pb2.RouterGenerateRequest:
    """Mixed prompts (text or ids, 1 to ~300 tokens) and outputs (1 to 256 tokens), stops, sampling."""
    n = int(round(rng.lognormvariate(2.5, 1.0))) + 1
    sampling = common_pb2.SamplingParams(max_tokens=max(1, min(256, int(rng.lognormvariate(3.5, 1.0)))))
    if rng.random() < 0.5:
        sampling.temperature = 0.0
    else:
        sampling.temperature, sampling.seed, sampling.top_p = 0.8, rng.randrange(1 << 30), 0.95
    if rng.random() < 0.3:
        sampling.ignore_eos = True
    req = router_pb2.RouterGenerateRequest(sampling=sampling, return_tokens=rng.random() < 0.5)
    if rng.random() < 0.7:
        req.text = " ".join(rng.choice(WORDS) for _ in range(min(n, 250)))
    else:
        req.token_ids.ids.extend([1] + [rng.randrange(3, vocab) for _ in range(min(n, 300))])
    if rng.random() < 0.3:
        req.stop.extend(rng.sample(STOPS, rng.randint(1, 2)))
    return req


async def one_request(stub, req, rng: random.Random, tally: Tally) -> grpc.StatusCode | None:
    """Send, maybe cancel at a random point or give a short deadline; tally how it ended (returns
    the status code when the call failed)."""
    tally.accepted += 1
    timeout = rng.uniform(0.05, 1.5) if rng.random() < 0.1 else 60.0
    cancel_after = rng.randint(0, 20) if rng.random() < 0.1 else None
    call = stub.Generate(req, timeout=timeout)
    last, seen = None, 0
    try:
        async for resp in call:
            last, seen = resp, seen + 1
            if cancel_after is not None and seen > cancel_after:
                call.cancel()
                break
    except grpc.aio.AioRpcError as exc:
        tally.end(f"status:{exc.code().name}", exc.details() or "")
        return exc.code()
    if cancel_after is not None and seen > cancel_after:
        tally.end("client_cancel")
    elif last is None or last.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED:
        tally.lost += 1
    elif last.finish_reason == common_pb2.FINISH_REASON_ERROR:
        tally.end(f"stream_error:{common_pb2.ErrorReason.Name(last.error.reason)}", last.error.message)
    else:
        tally.completed += 1
        tally.end(f"finish:{common_pb2.FinishReason.Name(last.finish_reason).removeprefix('FINISH_REASON_')}")


async def client_loop(address: str, until: float, seed: int, tally: Tally, vocab: int) -> None:
    rng = random.Random(seed)
    async with create_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        while time.monotonic() < until:
            code = await one_request(stub, random_request(rng, vocab), rng, tally)
            # While the router restarts, back off instead of counting thousands of refused connections.
            await asyncio.sleep(0.25 if code == grpc.StatusCode.UNAVAILABLE else rng.uniform(0, 0.05))


def rss_mb(pid: int | None) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration, TypeError):
        return None
    return round(kb / 1024, 1)


class Mesh:
    """The soak's processes, by name; restarts keep the name and the port."""

    def __init__(self, model: str, log_dir: pathlib.Path):
        self.model, self.log_dir = model, log_dir
        self.procs: dict[str, ServiceProcess] = {}
        self.started_at: dict[str, float] = {}  # name -> monotonic time of the current process's start

    def _start(self, kind: str, name: str, args: list[str], port: int | None = None) -> ServiceProcess:
        extra = ["--port", str(port)] if port else []
        proc = ServiceProcess(kind, name, [*args, *extra], env=CHILD_ENV, log_path=str(self.log_dir / f"{name}.log"),
                              die_with_parent=True).start()
        self.procs[name], self.started_at[name] = proc, time.monotonic()
        return proc

    def engine_args(self, i: int) -> list[str]:
        return ["--model", self.model, "--num-gpu-blocks-override", str(ENGINE_BLOCKS[i]), "--grace", "5"]

    def router_args(self) -> list[str]:
        engines = ",".join(self.procs[f"engine-{i}"].address for i in range(len(ENGINE_BLOCKS)))
        return ["--tokenizer", self.procs["tokenizer"].address, "--engines", engines, "--heartbeat-ms", "200",
                "--log-level", "WARNING", "--grace", "5"]

    def start(self) -> None:
        self._start("tokenizer", "tokenizer", ["--model", self.model])
        for i in range(len(ENGINE_BLOCKS)):
            self._start("engine", f"engine-{i}", self.engine_args(i))
        for proc in list(self.procs.values()):
            proc.wait_healthy(300)
        self._start("router", "router", self.router_args()).wait_healthy(120)

    def restart(self, name: str, args: list[str], kill: bool) -> float:
        """Kill (SIGKILL) or stop (SIGTERM) `name`, start it again on its port; seconds until healthy."""
        old = self.procs[name]
        t0 = time.monotonic()
        if kill:
            old.kill()
        else:
            old.stop(30)
        self._start(old.kind, name, args, port=old.port).wait_healthy(300)
        return round(time.monotonic() - t0, 2)

    def rss(self) -> dict[str, float | None]:
        return {name: rss_mb(p.pid) for name, p in self.procs.items()}

    def stop(self) -> dict[str, int | None]:
        return stop_all(list(self.procs.values()), timeout_s=30)


async def engine_loads(mesh: Mesh) -> dict[str, dict]:
    out = {}
    for name, proc in mesh.procs.items():
        if proc.kind != "engine":
            continue
        async with create_channel(proc.address) as channel:
            r = await engine_pb2_grpc.EngineStub(channel).GetLoad(engine_pb2.GetLoadRequest(), timeout=10)
        out[name] = {"total_blocks": r.total_blocks, "free_blocks": r.free_blocks, "cached_blocks": r.cached_blocks,
                     "in_use_blocks": r.in_use_blocks, "running": r.num_running_requests,
                     "waiting": r.num_waiting_requests}
    return out


async def wait_engines_idle(mesh: Mesh, timeout_s: float = 60.0) -> dict[str, dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        loads = await engine_loads(mesh)
        if all(v["in_use_blocks"] == 0 and v["running"] == 0 and v["waiting"] == 0 for v in loads.values()) \
                or time.monotonic() > deadline:
            return loads
        await asyncio.sleep(0.2)


async def sample_rss(mesh: Mesh, t0: float, until: float, every_s: float, samples: list) -> None:
    while time.monotonic() < until:
        samples.append({"t_s": round(time.monotonic() - t0, 1), "loadavg_1m": round(os.getloadavg()[0], 2),
                        "rss_mb": mesh.rss()})
        await asyncio.sleep(every_s)


async def chaos(mesh: Mesh, t0: float, duration_s: float, events: list) -> None:
    """SIGKILL engine-0 at 1/3 of the run and restart it; restart the router (SIGTERM) at 1/2."""
    await asyncio.sleep(max(0.0, t0 + duration_s / 3 - time.monotonic()))
    took = await asyncio.to_thread(mesh.restart, "engine-0", mesh.engine_args(0), True)
    events.append({"t_s": round(time.monotonic() - t0, 1), "event": "engine-0 SIGKILL + restart",
                   "healthy_after_s": took})
    await asyncio.sleep(max(0.0, t0 + duration_s / 2 - time.monotonic()))
    took = await asyncio.to_thread(mesh.restart, "router", mesh.router_args(), False)
    events.append({"t_s": round(time.monotonic() - t0, 1), "event": "router SIGTERM + restart",
                   "healthy_after_s": took})


def rss_growth(samples: list, mesh: Mesh, t0: float, warmup_s: float) -> dict[str, dict]:
    """Per process: RSS at the first sample after warm-up (of its current incarnation) and at the
    end, and the least-squares slope in MB per minute over that span."""
    out = {}
    for name in mesh.procs:
        since = mesh.started_at[name] - t0 + warmup_s
        points = [(s["t_s"], s["rss_mb"].get(name)) for s in samples if s["t_s"] >= max(since, warmup_s)]
        points = [(t, v) for t, v in points if v is not None]
        if len(points) < 3:
            out[name] = {"samples": len(points)}
            continue
        n = len(points)
        mt, mv = sum(t for t, _ in points) / n, sum(v for _, v in points) / n
        slope = sum((t - mt) * (v - mv) for t, v in points) / max(sum((t - mt) ** 2 for t, _ in points), 1e-9)
        out[name] = {"samples": n, "from_s": points[0][0], "rss_start_mb": points[0][1], "rss_end_mb": points[-1][1],
                     "rss_max_mb": max(v for _, v in points), "slope_mb_per_min": round(slope * 60, 3)}
    return out


async def soak(args) -> dict:
    log_dir = pathlib.Path(args.log_dir or tempfile.mkdtemp(prefix="kvmesh-soak-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    mesh = Mesh(args.model, log_dir)
    loadavg_start = round(os.getloadavg()[0], 2)
    await asyncio.to_thread(mesh.start)
    tally, samples, events = Tally(), [], []
    try:
        t0 = time.monotonic()
        until = t0 + args.duration
        router = mesh.procs["router"].address
        tasks = [asyncio.create_task(client_loop(router, until, args.seed + i, tally, args.vocab))
                 for i in range(args.clients)]
        tasks.append(asyncio.create_task(sample_rss(mesh, t0, until, args.rss_every, samples)))
        tasks.append(asyncio.create_task(chaos(mesh, t0, args.duration, events)))
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - t0
        loads = await wait_engines_idle(mesh)
        samples.append({"t_s": round(time.monotonic() - t0, 1), "loadavg_1m": round(os.getloadavg()[0], 2),
                        "rss_mb": mesh.rss()})
        growth = rss_growth(samples, mesh, t0, args.warmup)
    finally:
        exits = await asyncio.to_thread(mesh.stop)
    accounted = sum(tally.ends.values()) + tally.lost
    return {
        "benchmark": "soak", **environment(), "loadavg_1m_at_start": loadavg_start,
        "loadavg_1m_mean": round(sum(s["loadavg_1m"] for s in samples) / max(len(samples), 1), 2),
        "model": os.path.basename(args.model.rstrip("/")), "engine_blocks": list(ENGINE_BLOCKS),
        "duration_s": round(elapsed, 1), "clients": args.clients, "seed": args.seed,
        "requests": {"accepted": tally.accepted, "completed": tally.completed, "lost": tally.lost,
                     "accounted": accounted, "ends": dict(sorted(tally.ends.items())),
                     "unexpected_statuses": tally.unexpected},
        "events": events, "engines_at_end": loads,
        "used_blocks_at_end": sum(v["in_use_blocks"] for v in loads.values()),
        "rss_growth_after_warmup": growth, "warmup_s": args.warmup, "exit_codes": exits,
        "rss_samples": samples, "log_dir": str(log_dir),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REPO.parent / "shared" / "models" / "stories260k"))
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load (60 for the quick mode)")
    p.add_argument("--clients", type=int, default=6, help="concurrent client loops")
    p.add_argument("--vocab", type=int, default=512, help="token ids are drawn below this")
    p.add_argument("--warmup", type=float, default=60.0, help="seconds before RSS growth is judged")
    p.add_argument("--rss-every", type=float, default=5.0, help="seconds between RSS samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", default=None, help="child logs (default: a new temporary folder)")
    p.add_argument("--out", required=True, help="JSON results file")
    args = p.parse_args()
    result = asyncio.run(soak(args))
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    req = result["requests"]
    print(f"accepted {req['accepted']}, completed {req['completed']}, lost {req['lost']}, "
          f"used blocks at end {result['used_blocks_at_end']}; ends {req['ends']}")
    print("rss slope MB/min after warm-up:",
          {k: v.get("slope_mb_per_min") for k, v in result["rss_growth_after_warmup"].items()})
    ok = req["lost"] == 0 and req["accounted"] == req["accepted"] and result["used_blocks_at_end"] == 0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
