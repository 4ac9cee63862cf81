"""Prefix caching and cache-aware routing on a multi-turn chat workload with shared system prompts.

    python bench/prefix.py --model ../shared/models/stories260k --out bench/results/prefix-cpu-<date>.json
    # the GPU machine (8B shape, dummy weights; no fastapi/openai needed):
    python3 bench/prefix.py --gpu --out $OUT/prefix-h200.json

The workload (seeded): C conversations, each opening with one of S shared system prompts and a
document of its own (a pasted file, retrieved passages: `document_tokens`), T turns each; a turn's
prompt is the system prompt + the document + every earlier user turn and the tokens the engine
actually generated for it + a new user turn, so later turns can reuse blocks of earlier prompts AND
of earlier outputs. Every conversation is open from the start, as on a chat service where many
users are mid-conversation at once: each sends its next turn when its last answer is in, and at
most `--concurrency` requests are in flight. Token ids in, token ids out (ignore_eos): the text
tiers are not part of what is measured. The KV cache of one engine is sized below the
conversations' working set and the engines' together above it (CPU: --blocks, GPU:
--kv-cache-memory), as in a real deployment: a router that sends each turn wherever there is room
makes every engine cache every conversation, and LRU eviction then throws away the turns before it
comes back; one that follows the cache keeps each conversation on one engine, where it fits.

Two comparisons over the same engine processes (started once; runs are kept apart by cache_salt,
so no run finds another's blocks):
  cache:   one engine, requests with prefix_cache=false (caching off) vs on.
  routing: N engines behind the router's own engine table, KV-event followers, reservation ledger
           and policies (router/engines.py, router/kv_events.py, router/policy.py), in this process:
           cache_aware vs kv vs round_robin.
Per run: TTFT p50/p99, output-token and request throughput, the engines' prefix-cache hit rate
(cached / prompt tokens, from the responses' usage), and which engine served what.
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
import time
import uuid
from dataclasses import dataclass

REPO = pathlib.Path(__file__).resolve().parents[1]
if sys.path and pathlib.Path(sys.path[0]).resolve() == REPO / "bench":
    sys.path[0] = str(REPO)  # bench/router.py would shadow the router package
else:
    sys.path.insert(0, str(REPO))

import grpc  # noqa: E402

from bench.provenance import cpu_name, git_commit  # noqa: E402
from kvmesh.procs import ServiceProcess, stop_all  # noqa: E402
from kvmesh.v1 import common_pb2, engine_pb2  # noqa: E402
from router.engines import EnginePool  # noqa: E402
from router.kv_events import KvEventFollowers  # noqa: E402
from router.policy import PromptKey, make_policy  # noqa: E402
from router.prefix_index import PrefixIndex  # noqa: E402

CHILD_ENV = {"OMP_NUM_THREADS": "1", "OTEL_TRACES_EXPORTER": "none"}
POLICIES = ["cache_aware", "kv", "round_robin"]


@dataclass(frozen=True)
class Shape:
    system_prompts: int
    system_tokens: int
    conversations: int
    turns: int
    user_tokens: int
    max_tokens: int
    concurrency: int
    vocab: int
    document_tokens: int = 0

    def working_set_tokens(self) -> int:
        """KV tokens of every conversation at its end, shared system prompts counted once."""
        own = self.document_tokens + self.turns * (self.user_tokens + self.max_tokens)
        return self.system_prompts * self.system_tokens + self.conversations * own


# CPU: 24 x 216 + 8 x 192 = 6.7k tokens of working set vs 5k tokens (320 blocks) per engine.
CPU_SHAPE = Shape(system_prompts=8, system_tokens=192, conversations=24, turns=3, user_tokens=24,
                  max_tokens=16, concurrency=6, vocab=512, document_tokens=96)
# GPU: 48 x 2048 + 8 x 512 = 102k tokens vs 65.5k (8 GiB of 8B KV) per engine; cache-aware routing
# puts ~24 conversations (~53k tokens) on each engine.
GPU_SHAPE = Shape(system_prompts=8, system_tokens=512, conversations=48, turns=4, user_tokens=64,
                  max_tokens=64, concurrency=16, vocab=128000, document_tokens=1536)


@dataclass
class Outcome:
    sent_at: float
    first_at: float | None = None
    end_at: float | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_tokens: int = 0
    engine: str = ""
    error: str = ""


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


# ---- dispatch: straight to one engine, or through the router's table and a policy ----

class Direct:
    """Every request to one engine."""

    def __init__(self, engine):
        self.engine = engine

    async def generate(self, req: engine_pb2.GenerateRequest, out: Outcome) -> list[int]:
        return await _stream(self.engine, req, out)


class Routed:
    """The router's replica choice, without the text tiers: its engine table (watchers, load
    reports, reservations), its KV-event followers and prefix index, and one policy."""

    def __init__(self, pool: EnginePool, policy, rng: random.Random):
        self.pool, self.policy, self.rng = pool, policy, rng

    async def generate(self, req: engine_pb2.GenerateRequest, out: Outcome) -> list[int]:
        candidates = self.pool.candidates()
        prompt = PromptKey(req.prompt_token_ids, req.cache_salt)
        decision = self.policy.choose(req.request_id, candidates, len(req.prompt_token_ids),
                                      req.sampling.max_tokens, self.rng, prompt)
        if decision.chosen is None:
            out.error = "no engine: " + decision.reason
            return []
        engine = self.pool.begin(decision.chosen, req.request_id, decision.reserve_blocks)
        try:
            return await _stream(engine, req, out)
        finally:
            self.pool.end(engine, req.request_id)


async def _stream(engine, req: engine_pb2.GenerateRequest, out: Outcome) -> list[int]:
    """Run one Generate on an engine of the router's table (router/engine_client.py EngineClient),
    taking its attached load reports and acknowledging the request's pending blocks as the router's
    request path does."""
    tokens: list[int] = []
    out.engine = engine.address
    try:
        async for resp in engine.generate(req, timeout=600):
            if out.first_at is None and (resp.tokens or resp.finish_reason):
                engine.first_response(req.request_id, resp)
            elif resp.finish_reason:
                engine.last_response(resp)
            if resp.tokens and out.first_at is None:
                out.first_at = time.monotonic()
            tokens += [t.id for t in resp.tokens]
            if resp.finish_reason:
                out.num_cached_tokens = resp.usage.cached_prompt_tokens
    except grpc.aio.AioRpcError as exc:
        out.error = exc.code().name
    out.num_tokens = len(tokens)
    out.end_at = time.monotonic()
    return tokens


# ---- the workload ----

async def run_chat(dispatch, shape: Shape, seed: int, salt: str, use_cache: bool) -> tuple[list[Outcome], float]:
    rng = random.Random(seed)
    systems = [[1] + [rng.randrange(3, shape.vocab) for _ in range(shape.system_tokens - 1)]
               for _ in range(shape.system_prompts)]
    convs = [(systems[i % len(systems)], random.Random(seed * 1000 + i)) for i in range(shape.conversations)]
    in_flight = asyncio.Semaphore(shape.concurrency)
    outcomes: list[Outcome] = []

    async def conversation(system: list[int], crng: random.Random) -> None:
        history = list(system) + [crng.randrange(3, shape.vocab) for _ in range(shape.document_tokens)]
        for _ in range(shape.turns):
            history += [crng.randrange(3, shape.vocab) for _ in range(shape.user_tokens)]
            req = engine_pb2.GenerateRequest(
                request_id=uuid.uuid4().hex, prompt_token_ids=history, include_load=True, cache_salt=salt,
                prefix_cache=use_cache, sampling=common_pb2.SamplingParams(
                    temperature=0.0, max_tokens=shape.max_tokens, ignore_eos=True))
            async with in_flight:
                # TTFT counts from the send: the wait for a free slot is the client's, not the server's
                out = Outcome(sent_at=time.monotonic(), num_prompt_tokens=len(history))
                outcomes.append(out)
                history += await dispatch.generate(req, out)

    start = time.monotonic()
    await asyncio.gather(*(conversation(s, r) for s, r in convs))
    return outcomes, time.monotonic() - start


def summarize(outcomes: list[Outcome], duration_s: float, names: dict[str, str]) -> dict:
    ok = [o for o in outcomes if not o.error and o.first_at is not None]
    ttft = [o.first_at - o.sent_at for o in ok]
    prompt = sum(o.num_prompt_tokens for o in ok)
    return {
        "requests": len(outcomes), "completed": len(ok),
        "errors": dict(collections.Counter(o.error for o in outcomes if o.error)),
        "duration_s": round(duration_s, 3),
        "ttft_p50_s": _r(percentile(ttft, 50)), "ttft_p99_s": _r(percentile(ttft, 99)),
        "ttft_mean_s": _r(sum(ttft) / len(ttft) if ttft else None),
        "output_tok_s": round(sum(o.num_tokens for o in ok) / duration_s, 1),
        "requests_s": round(len(ok) / duration_s, 3),
        "prompt_tokens": prompt, "cached_prompt_tokens": sum(o.num_cached_tokens for o in ok),
        "cache_hit_rate": round(sum(o.num_cached_tokens for o in ok) / prompt, 4) if prompt else None,
        "assignments": dict(sorted(collections.Counter(names.get(o.engine, o.engine) for o in outcomes).items())),
    }


def _r(x):
    return None if x is None else round(x, 5)


# ---- processes and the two comparisons ----

def start_engines(args, log_dir: pathlib.Path) -> list[ServiceProcess]:
    flags = ["--model", args.model, "--device", args.device, "--max-model-len", str(args.max_model_len)]
    if args.load_format:
        flags += ["--load-format", args.load_format]
    if args.kv_cache_memory:
        flags += ["--kv-cache-memory", str(args.kv_cache_memory)]
    if args.blocks:
        flags += ["--num-gpu-blocks-override", str(args.blocks)]
    gpus = args.gpus.split(",") if args.gpus else []
    procs = []
    pythonpath = os.pathsep.join(x for x in (str(REPO), os.environ.get("PYTHONPATH", "")) if x)
    for i in range(args.engines):
        env = {**CHILD_ENV, "PYTHONPATH": pythonpath}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        procs.append(ServiceProcess("engine", f"engine-{i}", flags, log_path=str(log_dir / f"engine-{i}.log"),
                                    env=env, die_with_parent=True).start())
    try:
        for p in procs:
            p.wait_healthy(args.startup_timeout)
    except BaseException:
        stop_all(procs, timeout_s=10)
        for log in sorted(log_dir.glob("engine-*.log")):
            print(f"--- {log}\n{log.read_text()[-3000:]}", flush=True)
        raise
    return procs


async def _pool(addresses: list[str]) -> EnginePool:
    pool = EnginePool(staleness_bound_s=2.0, max_message_bytes=64 << 20, heartbeat_ms=500)
    pool.set_addresses(set(addresses))
    deadline = time.monotonic() + 60
    while len(pool.ready()) < len(addresses):
        if time.monotonic() > deadline:
            raise TimeoutError("engines not admitted by the engine table")
        await asyncio.sleep(0.05)
    return pool


async def bench(args, shape: Shape, engines: list[ServiceProcess]) -> dict:
    addresses = [p.address for p in engines]
    names = {a: f"engine-{i}" for i, a in enumerate(addresses)}
    pool = await _pool(addresses)
    results: dict = {"cache": {}, "routing": {}}
    try:
        one = Direct(pool.engines[addresses[0]])
        await run_chat(one, Shape(**{**shape.__dict__, "conversations": 2, "turns": 2}), 99, "warmup", True)
        for rep in range(args.repeats):
            for label, use in (("off", False), ("on", True)):
                outs, dur = await run_chat(one, shape, args.seed + rep, f"cache-{label}-{rep}", use)
                results["cache"].setdefault(label, []).append(summarize(outs, dur, names))
                print(f"cache {label}: {results['cache'][label][-1]}", flush=True)
        for rep in range(args.repeats):
            for policy_name in args.policies.split(","):
                index = PrefixIndex(staleness_s=2.0)
                followers = KvEventFollowers(index, heartbeat_ms=500)
                followers.sync(pool.engines)
                await asyncio.sleep(1.0)  # snapshots in
                name, tuning = _policy_spec(policy_name, args.balance_requests)
                policy = make_policy(name, prefix_index=index, **tuning)
                outs, dur = await run_chat(Routed(pool, policy, random.Random(rep)), shape, args.seed + rep,
                                           f"route-{policy_name}-{rep}", True)
                await followers.close()
                results["routing"].setdefault(policy_name, []).append(summarize(outs, dur, names))
                print(f"routing {policy_name}: {results['routing'][policy_name][-1]}", flush=True)
    finally:
        await pool.close()
    return results


def _policy_spec(spec: str, balance_requests: float | None) -> tuple[str, dict]:
    """"cache_aware@16" -> ("cache_aware", {"balance_requests": 16.0}); a bare name takes the
    --balance-requests value where one was given (cache_aware only), else the router's default."""
    name, _, balance = spec.partition("@")
    if balance:
        balance_requests = float(balance)
    if name != "cache_aware" or balance_requests is None:
        return name, {}
    return name, {"balance_requests": balance_requests}


def _median(runs: list[dict], key: str):
    values = sorted(r[key] for r in runs if r.get(key) is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else round((values[mid - 1] + values[mid]) / 2, 5)


def ratios(results: dict) -> dict:
    keys = ["ttft_p50_s", "ttft_p99_s", "output_tok_s", "cache_hit_rate"]
    med = {group: {name: {k: _median(runs, k) for k in keys} for name, runs in results[group].items()}
           for group in results}
    c, r = med["cache"], med["routing"]

    def div(a, b):
        return round(a / b, 3) if a is not None and b else None

    def vs(name: str, base: str) -> dict:  # a cache_aware run against another policy's
        ca, other = r[name], r[base]
        return {"ttft_p50_speedup": div(other.get("ttft_p50_s"), ca.get("ttft_p50_s")),
                "ttft_p99_speedup": div(other.get("ttft_p99_s"), ca.get("ttft_p99_s")),
                "throughput_ratio": div(ca.get("output_tok_s"), other.get("output_tok_s"))}
    return {
        "medians": med,
        "cache_on_vs_off": {"ttft_p50_speedup": div(c["off"]["ttft_p50_s"], c["on"]["ttft_p50_s"]),
                            "ttft_p99_speedup": div(c["off"]["ttft_p99_s"], c["on"]["ttft_p99_s"]),
                            "throughput_ratio": div(c["on"]["output_tok_s"], c["off"]["output_tok_s"])},
        **{f"{ca}_vs_{base}": vs(ca, base) for ca in r if ca.startswith("cache_aware")
           for base in ("kv", "round_robin") if base in r},
    }


def device_name(args) -> str:
    if args.device.startswith("cuda"):
        try:
            import torch
            return f"cuda: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
        except Exception:  # noqa: BLE001 - provenance only
            return "cuda"
    return f"cpu: {cpu_name()} x{os.cpu_count()}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="the H200 preset: 8B shape (bench/configs/llama3-8b), "
                   "dummy weights, cuda, 3 engines with 6 GiB of KV each, the GPU workload shape")
    p.add_argument("--model", default=str(REPO.parent / "shared/models/stories260k"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--load-format", default=None)
    p.add_argument("--engines", type=int, default=None, help="engine processes (default 2; --gpu: 3)")
    p.add_argument("--gpus", default="", help="comma-separated GPU ids, assigned to engines in turn")
    p.add_argument("--blocks", type=int, default=None, help="KV blocks per engine (--num-gpu-blocks-override)")
    p.add_argument("--kv-cache-memory", type=int, default=None, help="KV bytes per engine")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--conversations", type=int, default=None)
    p.add_argument("--concurrency", type=int, default=None)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--balance-requests", type=float, default=None,
                   help="the cache_aware policy's balance_requests (default: the router's)")
    p.add_argument("--policies", default=",".join(POLICIES),
                   help="routing policies to compare; cache_aware@B runs cache_aware with balance_requests B")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    shape = GPU_SHAPE if args.gpu else CPU_SHAPE
    if args.gpu:
        # 6 GiB = 49k tokens of 8B KV per engine: GPU_SHAPE's working set is 102k tokens, a third of
        # it ~36k. Three engines: the kv policy lands a turn where the conversation's last turn ran
        # about a third of the time (two engines: half, which leaves the median on the edge).
        args.model, args.device, args.load_format = str(REPO / "bench/configs/llama3-8b"), "cuda", "dummy"
        args.kv_cache_memory = args.kv_cache_memory or 6 << 30
        args.engines = args.engines or 3
    args.engines = args.engines or 2
    if args.device == "cpu" and args.blocks is None:
        args.blocks = 320  # 5k tokens per engine; CPU_SHAPE's working set is 6.7k tokens
    if args.conversations or args.concurrency:
        shape = Shape(**{**shape.__dict__, "conversations": args.conversations or shape.conversations,
                         "concurrency": args.concurrency or shape.concurrency})
    longest = shape.system_tokens + shape.document_tokens + shape.turns * (shape.user_tokens + shape.max_tokens)
    args.max_model_len = args.max_model_len or max(512, longest)
    log_dir = pathlib.Path(f"/tmp/kvmesh-bench-prefix-{os.getpid()}")
    log_dir.mkdir(parents=True, exist_ok=True)
    engines = start_engines(args, log_dir)
    try:
        results = asyncio.run(bench(args, shape, engines))
    finally:
        stop_all(engines, timeout_s=20)
    report = {
        "benchmark": "prefix", "device": device_name(args), "git_commit": git_commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": args.model if not args.gpu else "llama3-8b shape, dummy weights",
        "engines": args.engines, "workload": {**shape.__dict__, "working_set_tokens": shape.working_set_tokens()},
        "kv_cache_memory_per_engine": args.kv_cache_memory, "blocks_per_engine": args.blocks, "gpus": args.gpus or None,
        "repeats": args.repeats,
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
        "results": results, "summary": ratios(results),
    }
    text = json.dumps(report, indent=1)
    print(json.dumps(report["summary"], indent=1))
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
