"""What the router and tokenizer tiers cost: TTFT and token throughput through the router vs straight
to the engine, in the same run, on the same engine, under the same load.

    python bench/overhead.py --model ../shared/models/stories260k --out bench/results/overhead-<device>-<date>.json

For each concurrency level, rounds alternate between the two paths (direct, router, router, direct,
...) so that drift in the machine's state hits both alike. The direct path sends the prompt's ids,
tokenized once beforehand (outside the timing); the router path sends the text, so its numbers
include tokenization, the choice of engine and streaming detokenization. Greedy, ignore_eos, a
fixed max_tokens: both paths generate exactly the same tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("bench_router", HERE / "router.py")
bench_router = importlib.util.module_from_spec(_spec)
sys.modules["bench_router"] = bench_router  # dataclasses look their module up there
_spec.loader.exec_module(bench_router)  # sets up sys.path for kvmesh as well

from kvmesh.procs import stop_all  # noqa: E402
from kvmesh.serving.channels import create_channel  # noqa: E402
from kvmesh.v1 import (common_pb2, engine_pb2, engine_pb2_grpc, router_pb2, router_pb2_grpc,  # noqa: E402
                       tokenizer_pb2, tokenizer_pb2_grpc)

PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play"


async def _timed(stream) -> tuple[float | None, int, float]:
    """(time to the first token, tokens, end time) of one stream; times are monotonic seconds."""
    first, n = None, 0
    async for resp in stream:
        if resp.tokens and first is None:
            first = time.monotonic()
        n += len(resp.tokens)
    return first, n, time.monotonic()


async def _worker(call_fn, num_requests: int, samples: list) -> None:
    for _ in range(num_requests):
        sent = time.monotonic()
        first, n, end = await _timed(call_fn())
        samples.append((first - sent, n, end - sent))


async def run_phase(call_fn, concurrency: int, per_worker: int) -> dict:
    samples: list = []
    start = time.monotonic()
    await asyncio.gather(*(_worker(call_fn, per_worker, samples) for _ in range(concurrency)))
    wall = time.monotonic() - start
    return {"samples": samples, "wall_s": wall}


def merge(phases: list[dict]) -> dict:
    ttft = [s[0] for p in phases for s in p["samples"]]
    tokens = sum(s[1] for p in phases for s in p["samples"])
    wall = sum(p["wall_s"] for p in phases)
    pct = bench_router.percentile
    return {"requests": len(ttft), "ttft_p50_ms": round(pct(ttft, 50) * 1e3, 3),
            "ttft_p99_ms": round(pct(ttft, 99) * 1e3, 3), "ttft_mean_ms": round(sum(ttft) / len(ttft) * 1e3, 3),
            "throughput_tok_s": round(tokens / wall, 1), "tokens": tokens, "wall_s": round(wall, 3)}


async def measure(tok_addr: str, engine_addr: str, router_addr: str, levels: list[int], rounds: int,
                  per_worker: int, max_tokens: int) -> dict:
    sampling = common_pb2.SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens)
    async with create_channel(tok_addr) as tc, create_channel(engine_addr) as ec, create_channel(router_addr) as rc:
        ids = list((await tokenizer_pb2_grpc.TokenizerStub(tc).Tokenize(
            tokenizer_pb2.TokenizeRequest(text=PROMPT))).token_ids)
        engine = engine_pb2_grpc.EngineStub(ec)
        router = router_pb2_grpc.RouterStub(rc)
        paths = {
            "direct": lambda: engine.Generate(engine_pb2.GenerateRequest(prompt_token_ids=ids, sampling=sampling)),
            "router": lambda: router.Generate(router_pb2.RouterGenerateRequest(text=PROMPT, sampling=sampling,
                                                                               return_tokens=True)),
        }
        for fn in paths.values():  # warm up both paths (connections, caches)
            await run_phase(fn, 2, 2)
        results = {}
        for c in levels:
            phases = {"direct": [], "router": []}
            for r in range(rounds):
                order = ["direct", "router"] if r % 2 == 0 else ["router", "direct"]
                for name in order:
                    phases[name].append(await run_phase(paths[name], c, per_worker))
            d, rt = merge(phases["direct"]), merge(phases["router"])
            results[f"concurrency_{c}"] = {
                "direct": d, "router": rt,
                "ttft_added_p50_ms": round(rt["ttft_p50_ms"] - d["ttft_p50_ms"], 3),
                "throughput_ratio": round(rt["throughput_tok_s"] / d["throughput_tok_s"], 4),
            }
            print(f"concurrency {c}: {json.dumps(results[f'concurrency_{c}'])}", flush=True)
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(bench_router.REPO.parent / "shared" / "models" / "stories260k"))
    parser.add_argument("--blocks", type=int, default=512, help="KV blocks of the engine")
    parser.add_argument("--concurrency", default="1,8", help="concurrent streams per level")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds per path and level")
    parser.add_argument("--per-worker", type=int, default=8, help="sequential requests per stream per round")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", default=None)
    parser.add_argument("--log-dir", default="/tmp/kvmesh-bench-overhead")
    args = parser.parse_args()

    log_dir = pathlib.Path(args.log_dir)
    tok, engines = bench_router.start_services(args.model, [args.blocks], log_dir)
    router = None
    try:
        router = bench_router.start_router(tok, engines, log_dir)
        levels = [int(c) for c in args.concurrency.split(",")]
        results = asyncio.run(measure(tok.address, engines[0].address, router.address, levels, args.rounds,
                                      args.per_worker, args.max_tokens))
    finally:
        stop_all([p for p in (router, tok, *engines) if p is not None])
    report = {"bench": "overhead", **bench_router.environment(), "model": pathlib.Path(args.model).name,
              "workload": {"prompt": PROMPT, "max_tokens": args.max_tokens, "temperature": 0.0, "ignore_eos": True,
                           "rounds": args.rounds, "requests_per_stream_per_round": args.per_worker,
                           "engine_kv_blocks": args.blocks},
              "note": "ttft = time to the first generated token as the client sees it; the router path includes "
                      "Tokenize, the engine choice and DetokenizeStream; the direct path sends ids tokenized once "
                      "beforehand",
              "results": results}
    bench_router.write_report(report, args.out)


if __name__ == "__main__":
    sys.exit(main())
