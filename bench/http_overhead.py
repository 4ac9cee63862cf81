"""What the OpenAI-compatible HTTP front costs beside the router's gRPC front: TTFT, token throughput
and the router's CPU per token, same router process, same engine, same load, in one run.

    python bench/http_overhead.py --out bench/results/http-overhead-<device>-<date>.json

Both paths stream the same greedy request (text prompt, ignore_eos, a fixed max_tokens) through one
router started with --http-port: gRPC Generate on one side, POST /v1/completions with stream=true
(SSE, parsed line by line with httpx, the transport the openai client uses) on the other. Rounds
alternate between the paths (grpc, http, http, grpc, ...) so that drift in the machine's state
hits both alike. TTFT is the time to the first non-empty text delta on both sides; tokens come from
the token records (gRPC) and from usage (HTTP, stream_options.include_usage). The router's CPU
seconds (user + system, /proc) are read around each phase. Reuses bench/overhead.py's merge() and
bench/router.py's process helpers.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("bench_overhead", HERE / "overhead.py")
bench_overhead = importlib.util.module_from_spec(_spec)
sys.modules["bench_overhead"] = bench_overhead
_spec.loader.exec_module(bench_overhead)  # loads bench/router.py too, which puts the repo on sys.path
bench_router = bench_overhead.bench_router

import httpx  # noqa: E402

from kvmesh.procs import stop_all  # noqa: E402
from kvmesh.serving.channels import create_channel  # noqa: E402
from kvmesh.v1 import common_pb2, router_pb2, router_pb2_grpc  # noqa: E402

PROMPT = bench_overhead.PROMPT
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


async def grpc_stream(stub, max_tokens: int) -> tuple[float | None, int]:
    """(first text time, tokens) of one gRPC Generate."""
    req = router_pb2.RouterGenerateRequest(text=PROMPT, return_tokens=True, sampling=common_pb2.SamplingParams(
        temperature=0.0, ignore_eos=True, max_tokens=max_tokens))
    first, n = None, 0
    async for resp in stub.Generate(req):
        if resp.text and first is None:
            first = time.monotonic()
        n += len(resp.tokens)
    return first, n


async def http_stream(http: httpx.AsyncClient, max_tokens: int) -> tuple[float | None, int]:
    """(first text time, tokens) of one streaming /v1/completions."""
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    first, n = None, 0
    async with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"] and first is None:
                first = time.monotonic()
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
    return first, n


async def run_phase(stream_fn, concurrency: int, per_worker: int, router_pid: int) -> dict:
    samples: list = []

    async def worker():
        for _ in range(per_worker):
            sent = time.monotonic()
            first, n = await stream_fn()
            samples.append((first - sent, n, time.monotonic() - sent))

    cpu0, start = cpu_seconds(router_pid), time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"samples": samples, "wall_s": time.monotonic() - start, "router_cpu_s": cpu_seconds(router_pid) - cpu0}


def summary(phases: list[dict]) -> dict:
    out = bench_overhead.merge(phases)
    cpu = sum(p["router_cpu_s"] for p in phases)
    out["router_cpu_s"] = round(cpu, 3)
    out["router_cpu_ms_per_token"] = round(cpu / out["tokens"] * 1e3, 4)
    out["router_cpu_util"] = round(cpu / out["wall_s"], 3)  # cores the router kept busy
    return out


async def measure(grpc_address: str, http_url: str, router_pid: int, levels: list[int], rounds: int,
                  per_worker: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with create_channel(grpc_address) as channel, \
            httpx.AsyncClient(base_url=http_url, limits=limits, timeout=120) as http:
        stub = router_pb2_grpc.RouterStub(channel)
        paths = {"grpc": lambda: grpc_stream(stub, max_tokens), "http": lambda: http_stream(http, max_tokens)}
        for fn in paths.values():  # warm up both paths (connections, caches)
            await run_phase(fn, 2, 2, router_pid)
        results = {}
        for c in levels:
            phases = {"grpc": [], "http": []}
            for r in range(rounds):
                for name in (["grpc", "http"] if r % 2 == 0 else ["http", "grpc"]):
                    phases[name].append(await run_phase(paths[name], c, per_worker, router_pid))
            g, h = summary(phases["grpc"]), summary(phases["http"])
            results[f"concurrency_{c}"] = {
                "grpc": g, "http": h,
                "ttft_added_p50_ms": round(h["ttft_p50_ms"] - g["ttft_p50_ms"], 3),
                "throughput_ratio": round(h["throughput_tok_s"] / g["throughput_tok_s"], 4),
                "router_cpu_per_token_ratio": round(h["router_cpu_ms_per_token"] / g["router_cpu_ms_per_token"], 3),
            }
            print(f"concurrency {c}: {json.dumps(results[f'concurrency_{c}'])}", flush=True)
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(bench_router.REPO.parent / "shared" / "models" / "stories260k"),
                        help="checkpoint directory")
    parser.add_argument("--blocks", type=int, default=512, help="KV blocks of the engine")
    parser.add_argument("--concurrency", default="1,8", help="concurrent streams per level")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds per path and level")
    parser.add_argument("--per-worker", type=int, default=6, help="sequential requests per stream per round")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per request")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument("--log-dir", default="/tmp/kvmesh-bench-http-overhead", help="service logs")
    args = parser.parse_args()

    log_dir = pathlib.Path(args.log_dir)
    port_file = log_dir / "http.port"
    tok, engines = bench_router.start_services(args.model, [args.blocks], log_dir)
    router = None
    try:
        router = bench_router.start_router(tok, engines, log_dir, "--http-port", "0", "--http-port-file",
                                           str(port_file))
        http_url = f"http://127.0.0.1:{int(port_file.read_text())}"
        levels = [int(c) for c in args.concurrency.split(",")]
        results = asyncio.run(measure(router.address, http_url, router.pid, levels, args.rounds, args.per_worker,
                                      args.max_tokens))
    finally:
        stop_all([p for p in (router, tok, *engines) if p is not None])
    report = {"bench": "http_overhead", **bench_router.environment(), "model": pathlib.Path(args.model).name,
              "workload": {"prompt": PROMPT, "max_tokens": args.max_tokens, "temperature": 0.0, "ignore_eos": True,
                           "rounds": args.rounds, "requests_per_stream_per_round": args.per_worker,
                           "engine_kv_blocks": args.blocks},
              "note": "one router process serving both fronts; grpc = Router/Generate (grpc.aio client), http = "
                      "POST /v1/completions stream=true (httpx client, SSE); ttft = first non-empty text delta; "
                      "router_cpu = the router process's user+system CPU over the phases",
              "results": results}
    bench_router.write_report(report, args.out)


if __name__ == "__main__":
    sys.exit(main())
