"""Online serving: a request-rate sweep (Poisson arrivals) through the full stack and straight to the
engine, in the same run, on the same engine process.

    # GPU: the 8B shape, random weights (a vocabulary-sized word-level tokenizer stands in for the
    # missing tokenizer; see below)
    python3 bench/serving.py --device cuda --model bench/configs/llama3-8b --load-format dummy \
        --rates 8,16,32 --num-requests 200
    # CPU smoke (stories260k, its own tokenizer)
    python bench/serving.py --rates 2 --num-requests 6 --input-mean 16 --output-mean 8

Processes (real, on loopback, started as bench/router.py and bench/overhead.py start theirs): a
tokenizer, one engine, a router in front of both. Paths, alternating per rate so that drift hits
both alike:
- engine: Engine.Generate with the prompt's token ids (no tokenizer, no router);
- router: Router.Generate with the same token ids (`token_ids` input, return_tokens): adds the
  router's validation and replica choice and the tokenizer's streaming detokenization.
Workload: bench/harness.py's ShareGPT-like mix (log-normal lengths, means 215 / 197, sigma 1;
--input-mean / --output-mean shorten it), arrivals a Poisson process at each --rates value (seeded:
the same requests and gaps for both paths), ignore_eos, --temperature (default 0).

Per path and rate: TTFT p50/p99 (send to the first token), inter-token latency p50/p99 (gaps
between consecutive tokens of a stream; a response carrying k tokens counts as k gaps of 1/k of its
gap), TPOT p50/p99 (per request: (last - first token) / (tokens - 1)), throughput, and goodput:
requests/s that complete with TTFT <= --slo-ttft and TPOT <= --slo-tpot (defaults: 2 s and 100 ms on
the GPU, the SLOs of vLLM's and DistServe's goodput figures for chat; 10 s and 1 s on the CPU).
client_cpu_fraction near 1 says the client (one Python process) was the bottleneck, not the server.

A model directory without a tokenizer (bench/configs/*, for --load-format dummy) gets a word-level
tokenizer with one token "t<i>" per id of the model's vocabulary: detokenization still runs for every
token, over the real vocabulary size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grpc  # noqa: E402

from bench import harness  # noqa: E402
from bench.router import CHILD_ENV, percentile, wait_replicas  # noqa: E402
from kvmesh.procs import ServiceProcess, stop_all  # noqa: E402
from kvmesh.serving.channels import create_channel  # noqa: E402
from kvmesh.v1 import common_pb2, engine_pb2, engine_pb2_grpc, router_pb2, router_pb2_grpc  # noqa: E402

PATHS = ["engine", "router"]
SLO_DEFAULTS = {"cuda": (2.0, 0.1), "cpu": (10.0, 1.0)}  # (TTFT s, TPOT s)


def write_wordlevel_tokenizer(model_dir: str, into: pathlib.Path) -> str:
    """A tokenizer directory for a config-only model: token "t<i>" for every id of its vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    config = harness.model_config(model_dir)
    vocab = config["vocab_size"]
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    into.mkdir(parents=True, exist_ok=True)
    tok.save(str(into / "tokenizer.json"))
    eos = config.get("eos_token_id")
    first_eos = eos[0] if isinstance(eos, list) else eos
    (into / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.get("max_position_embeddings"),
        "bos_token": f"t{config.get('bos_token_id', 1)}", "eos_token": f"t{first_eos}"}))
    (into / "config.json").write_text(json.dumps(config))
    return str(into)


def tokenizer_dir(model: str, scratch: pathlib.Path) -> str:
    path = pathlib.Path(model)
    if model == "demo" or (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file():
        return model
    return write_wordlevel_tokenizer(model, scratch / "tokenizer")


def start_stack(args: argparse.Namespace, tok_dir: str, log_dir: pathlib.Path) -> list[ServiceProcess]:
    """Tokenizer, engine and router processes, all SERVING; [tokenizer, engine, router]."""
    log_dir.mkdir(parents=True, exist_ok=True)

    def service(kind: str, flags: list[str]) -> ServiceProcess:
        return ServiceProcess(kind, kind, flags, log_path=str(log_dir / f"{kind}.log"), env=CHILD_ENV,
                              die_with_parent=True).start()

    tok = service("tokenizer", ["--model", tok_dir])
    engine = service("engine", harness.engine_server_flags(args))
    procs = [tok, engine]
    try:
        for proc in procs:
            proc.wait_healthy(args.startup_timeout)
        router = service("router", ["--tokenizer", tok.address, "--engines", engine.address,
                                    "--log-level", "WARNING", "--max-tokens-limit", str(1 << 20)])
        procs.append(router)
        router.wait_healthy(120)
        asyncio.run(wait_replicas(router.address, 1))
    except BaseException:
        stop_all(procs)
        raise
    return procs


@dataclass(slots=True)
class Stream:
    """One request as the client saw it: when it was sent, when each batch of tokens arrived."""

    sent_at: float
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (time, tokens in the response)
    error: str = ""

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.arrivals)


async def one_request(call, delay_s: float, start: float, timeout_s: float) -> Stream:
    await asyncio.sleep(max(0.0, start + delay_s - time.monotonic()))
    s = Stream(sent_at=time.monotonic())
    try:
        async for resp in call(timeout_s):
            if resp.tokens:
                s.arrivals.append((time.monotonic(), len(resp.tokens)))
            if resp.HasField("error"):
                s.error = common_pb2.ErrorReason.Name(resp.error.reason)
    except grpc.aio.AioRpcError as exc:
        s.error = exc.code().name
    return s


def calls(path: str, stub, work: list[tuple[list[int], int]], temperature: float) -> list:
    """One zero-argument-but-timeout callable per request, for the given path."""
    def sampling(n: int) -> common_pb2.SamplingParams:
        return common_pb2.SamplingParams(temperature=temperature, ignore_eos=True, max_tokens=n)

    if path == "engine":
        return [lambda t, p=p, n=n: stub.Generate(engine_pb2.GenerateRequest(prompt_token_ids=p, sampling=sampling(n)),
                                                  timeout=t) for p, n in work]
    return [lambda t, p=p, n=n: stub.Generate(router_pb2.RouterGenerateRequest(
        token_ids=common_pb2.TokenIds(ids=p), sampling=sampling(n), return_tokens=True), timeout=t) for p, n in work]


async def run_rate(address: str, path: str, work, delays: list[float], args) -> tuple[list[Stream], float, float]:
    """Send every request at its arrival time; (streams, wall seconds, client CPU seconds)."""
    async with create_channel(address) as channel:
        stub = (engine_pb2_grpc.EngineStub if path == "engine" else router_pb2_grpc.RouterStub)(channel)
        fns = calls(path, stub, work, args.temperature)
        start, cpu = time.monotonic(), time.process_time()
        streams = await asyncio.gather(*(one_request(f, d, start, args.timeout) for f, d in zip(fns, delays)))
        return list(streams), time.monotonic() - start, time.process_time() - cpu


def summarize(streams: list[Stream], work, wall_s: float, cpu_s: float, slo_ttft: float, slo_tpot: float) -> dict:
    ok = [(s, n) for s, (_, n) in zip(streams, work) if not s.error and s.num_tokens == n and s.arrivals]
    ttft = [s.arrivals[0][0] - s.sent_at for s, _ in ok]
    tpot = [(s.arrivals[-1][0] - s.arrivals[0][0]) / (s.num_tokens - 1) for s, _ in ok if s.num_tokens > 1]
    itl = []
    for s, _ in ok:
        for (t0, _), (t1, k) in zip(s.arrivals, s.arrivals[1:]):
            itl.extend([(t1 - t0) / k] * k)
    good = [s for s, _ in ok if s.arrivals[0][0] - s.sent_at <= slo_ttft and
            (s.num_tokens <= 1 or (s.arrivals[-1][0] - s.arrivals[0][0]) / (s.num_tokens - 1) <= slo_tpot)]
    errors: dict[str, int] = {}
    for s, (_, n) in zip(streams, work):
        if s.error or s.num_tokens != n:
            key = s.error or "WRONG_TOKEN_COUNT"
            errors[key] = errors.get(key, 0) + 1
    ms = lambda xs, q: None if not xs else round(percentile(xs, q) * 1e3, 2)  # noqa: E731
    return {"requests": len(streams), "completed": len(ok), "errors": errors, "wall_s": round(wall_s, 3),
            "requests_per_s": round(len(ok) / wall_s, 3),
            "output_tokens_per_s": round(sum(s.num_tokens for s, _ in ok) / wall_s, 1),
            "goodput_rps": round(len(good) / wall_s, 3), "goodput_fraction": round(len(good) / len(streams), 3),
            "ttft_p50_ms": ms(ttft, 50), "ttft_p99_ms": ms(ttft, 99), "itl_p50_ms": ms(itl, 50),
            "itl_p99_ms": ms(itl, 99), "tpot_p50_ms": ms(tpot, 50), "tpot_p99_ms": ms(tpot, 99),
            "client_cpu_fraction": round(cpu_s / wall_s, 3)}


def poisson_delays(n: int, rate: float, seed: int) -> list[float]:
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_engine_args(p, **harness.GPU_ENGINE)
    harness.add_mix_args(p, num_requests=200)
    p.add_argument("--rates", default="8,16,32", help="comma-separated request rates (req/s)")
    p.add_argument("--paths", default=",".join(PATHS), help="engine, router or both")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--slo-ttft", type=float, default=None, help="seconds (default: 2 on CUDA, 10 on CPU)")
    p.add_argument("--slo-tpot", type=float, default=None, help="seconds (default: 0.1 on CUDA, 1 on CPU)")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request deadline, seconds")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--log-dir", default=None, help="children's logs (default: a temporary directory)")
    args = p.parse_args(argv)
    slo = SLO_DEFAULTS[harness.device_kind(args.device)]
    args.slo_ttft = args.slo_ttft if args.slo_ttft is not None else slo[0]
    args.slo_tpot = args.slo_tpot if args.slo_tpot is not None else slo[1]
    args.max_model_len = harness.effective_max_model_len(args)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    config = harness.model_config(args.model)
    vocab = config.get("vocab_size", 512)
    work = harness.mix_from_args(args, vocab, args.max_model_len or 2048)
    rates, paths = [float(r) for r in args.rates.split(",")], args.paths.split(",")
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="kvmesh-bench-serving-") as scratch:
        log_dir = pathlib.Path(args.log_dir or scratch)
        tok_dir = tokenizer_dir(args.model, pathlib.Path(scratch))
        procs = start_stack(args, tok_dir, log_dir)
        address = {"engine": procs[1].address, "router": procs[2].address}
        try:
            asyncio.run(run_rate(address[paths[0]], paths[0], work[:2], [0.0, 0.0], args))  # warm-up
            for i, rate in enumerate(rates):
                delays = poisson_delays(len(work), rate, args.seed)
                for path in (paths if i % 2 == 0 else paths[::-1]):
                    streams, wall, cpu = asyncio.run(run_rate(address[path], path, work, delays, args))
                    results.setdefault(f"rate_{rate:g}", {})[path] = summarize(
                        streams, work, wall, cpu, args.slo_ttft, args.slo_tpot)
                    print(f"rate {rate:g} {path}: {json.dumps(results[f'rate_{rate:g}'][path])}", flush=True)
        finally:
            stop_all(procs)
    report = {"config": {"model": pathlib.Path(args.model).name, "model_path": args.model,
                         "engine_flags": harness.engine_server_flags(args),
                         "tokenizer": args.model if tok_dir == args.model else "word-level, one token per id"},
              "slo": {"ttft_s": args.slo_ttft, "tpot_s": args.slo_tpot},
              "workload": {**harness.describe_mix(work, **harness.mix_params(args)), "arrivals": "poisson",
                           "rates_rps": rates, "temperature": args.temperature, "ignore_eos": True},
              "results": results}
    report, out_paths = harness.save_report(f"serving-{pathlib.Path(args.model).name}", report, args.device, args.out)
    harness.print_table(
        ["rate", "path", "req/s", "tok/s", "goodput", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "errors"],
        [[rate.removeprefix("rate_"), path, r["requests_per_s"], r["output_tokens_per_s"], r["goodput_rps"],
          r["ttft_p50_ms"], r["ttft_p99_ms"], r["itl_p50_ms"], r["itl_p99_ms"], sum(r["errors"].values())]
         for rate, by_path in results.items() for path, r in by_path.items()],
        title=f"serving: {report['config']['model']}, {len(work)} requests per rate and path, SLO TTFT "
              f"{args.slo_ttft:g} s / TPOT {args.slo_tpot * 1e3:g} ms, times in ms, {report['device']}; "
              f"wrote {', '.join(out_paths)}")
    return report


if __name__ == "__main__":
    sys.exit(main() and 0)
