"""Where the router path's time to first token goes at one stream: each hop timed on its own.

    python bench/ttft_hops.py --out bench/results/ttft-hops-<device>-<date>.json
    # a GPU engine: add --device cuda (and --model $KVMESH_TEST_MODELS/stories260k)

Starts the mesh as bench/overhead.py does (tokenizer, one engine, router; the services of this
checkout) and, from one client, one request at a time, alternating, times:
- tokenize: a Tokenize round trip (a unary call: the router's first hop before TokenizeStream);
- tokenize_stream: a message pair on an open TokenizeStream (the router's first hop);
- detokenize: a first message on an open DetokenizeSessions stream (open + one id + finish: the
  router's first detokenize round trip);
- engine_generate: the engine's first response on its own Generate call (ids in);
- engine_stream: the engine's first response on an open GenerateStream (the router's engine hop);
- router: the router's first response with a token (text in: every hop above, plus the client <->
  router hop and the router's own work);
- with --compare-unix-tokenizer the tokenizer also listens on a unix-domain socket:
  tokenize_stream_unix and detokenize_unix time the same hops on it, router_unix a second router
  that dials the tokenizer there (transport side by side in one run);
- router_base, with --compare-tiers-from CHECKOUT: the same through a router and tokenizer run
  from that checkout's code over the same engine (a before/after of the tiers in one run).
`router_rest_ms` = router - (tokenize_stream + engine_stream + detokenize): the client <-> router hop and the
router's own work. Every request generates one token (greedy), so each sample is a first token.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.overhead import (PROMPT, environment, percentile, start_mesh, tokenizer_unix_socket,  # noqa: E402
                            tree_commit)
from bench.provenance import write_report  # noqa: E402
from kvmesh.procs import stop_all  # noqa: E402
from kvmesh.serving.channels import create_channel  # noqa: E402
from kvmesh.v1 import (common_pb2, engine_pb2, engine_pb2_grpc, router_pb2, router_pb2_grpc,  # noqa: E402
                       tokenizer_pb2, tokenizer_pb2_grpc)

ONE_TOKEN = common_pb2.SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)


class Hops:
    """One client's calls to each tier; each method times one first token (seconds)."""

    def __init__(self, tokenizer, engine, router, ids: list[int], router_base=None):
        self.tokenizer, self.engine, self.router, self.ids = tokenizer, engine, router, ids
        self.router_base = router_base
        self.router_unix = None  # with --compare-unix-tokenizer: the router dialing the tokenizer's unix socket
        self._detok = tokenizer.DetokenizeSessions()
        self._tok = tokenizer.TokenizeStream()
        self._gen = engine.GenerateStream()
        self._n = 0

    def on(self, tokenizer) -> "Hops":
        """The tokenizer hops of these, on another channel to the tokenizer (its unix socket)."""
        hops = Hops(tokenizer, self.engine, self.router, self.ids)
        hops._n = 1 << 40  # session and item ids apart from this one's
        return hops

    async def tokenize(self) -> float:
        t = time.perf_counter()
        await self.tokenizer.Tokenize(tokenizer_pb2.TokenizeRequest(text=PROMPT))
        return time.perf_counter() - t

    async def tokenize_stream(self) -> float:
        self._n += 1
        item = tokenizer_pb2.TokenizeItem(item_id=self._n, request=tokenizer_pb2.TokenizeRequest(text=PROMPT))
        t = time.perf_counter()
        await self._tok.write(tokenizer_pb2.TokenizeStreamRequest(items=[item]))
        await self._tok.read()
        return time.perf_counter() - t

    async def detokenize(self) -> float:
        self._n += 1
        inp = tokenizer_pb2.SessionInput(session_id=self._n, token_ids=[self.ids[-1]], finish=True,
                                         open=tokenizer_pb2.DetokenizeStreamStart(prompt_token_ids=self.ids))
        t = time.perf_counter()
        await self._detok.write(tokenizer_pb2.DetokenizeSessionsRequest(inputs=[inp]))
        await self._detok.read()
        return time.perf_counter() - t

    async def engine_generate(self) -> float:
        t = time.perf_counter()
        async for _ in self.engine.Generate(engine_pb2.GenerateRequest(prompt_token_ids=self.ids, sampling=ONE_TOKEN)):
            return time.perf_counter() - t

    async def engine_stream(self) -> float:
        self._n += 1
        req = engine_pb2.GenerateRequest(request_id=f"hop-{self._n}", prompt_token_ids=self.ids, sampling=ONE_TOKEN)
        t = time.perf_counter()
        await self._gen.write(engine_pb2.GenerateStreamRequest(requests=[req]))
        while not (await self._gen.read()).responses:
            pass
        return time.perf_counter() - t

    async def router_first_token(self) -> float:
        return await self._first_token(self.router)

    async def router_base_first_token(self) -> float:
        return await self._first_token(self.router_base)

    async def router_unix_first_token(self) -> float:
        return await self._first_token(self.router_unix)

    @staticmethod
    async def _first_token(router) -> float:
        t = time.perf_counter()
        async for resp in router.Generate(router_pb2.RouterGenerateRequest(text=PROMPT, sampling=ONE_TOKEN,
                                                                                 return_tokens=True)):
            if resp.tokens:
                return time.perf_counter() - t
        raise RuntimeError("the router sent no token")

    def close(self) -> None:
        self._detok.cancel()
        self._tok.cancel()
        self._gen.cancel()


async def measure(procs, samples: int, unix_socket: pathlib.Path | None = None) -> dict:
    async with contextlib.AsyncExitStack() as stack:
        names = ["tokenizer", "engine", "router", *(["router_base"] if "router_base" in procs else [])]
        channels = [await stack.enter_async_context(create_channel(procs[n].address)) for n in names]
        tok = tokenizer_pb2_grpc.TokenizerStub(channels[0])
        ids = list((await tok.Tokenize(tokenizer_pb2.TokenizeRequest(text=PROMPT))).token_ids)
        hops = Hops(tok, engine_pb2_grpc.EngineStub(channels[1]), router_pb2_grpc.RouterStub(channels[2]), ids,
                    router_pb2_grpc.RouterStub(channels[3]) if len(channels) > 3 else None)
        fns = {"tokenize": hops.tokenize, "tokenize_stream": hops.tokenize_stream, "detokenize": hops.detokenize, "engine_generate": hops.engine_generate,
               "engine_stream": hops.engine_stream, "router": hops.router_first_token}
        if hops.router_base is not None:
            fns["router_base"] = hops.router_base_first_token
        unix_hops = None
        if unix_socket is not None:  # the same tokenizer and router code; the tokenizer hops on its unix socket
            unix_tok = await stack.enter_async_context(create_channel(f"unix:{unix_socket}"))
            unix_hops = hops.on(tokenizer_pb2_grpc.TokenizerStub(unix_tok))
            hops.router_unix = router_pb2_grpc.RouterStub(
                await stack.enter_async_context(create_channel(procs["router_unix"].address)))
            fns.update({"tokenize_stream_unix": unix_hops.tokenize_stream, "detokenize_unix": unix_hops.detokenize,
                        "router_unix": hops.router_unix_first_token})
        times: dict[str, list[float]] = {name: [] for name in fns}
        for i in range(samples + 5):  # the first 5 rounds warm up (connections, caches)
            for name, fn in (fns.items() if i % 2 else reversed(fns.items())):
                elapsed = await fn()
                await asyncio.sleep(0.005)  # paced, as one stream's requests are
                if i >= 5:
                    times[name].append(elapsed)
        hops.close()
        if unix_hops is not None:
            unix_hops.close()
    p50 = {name: round(percentile(v, 50) * 1e3, 3) for name, v in times.items()}
    p50["router_rest_ms"] = round(p50["router"] - p50["tokenize_stream"] - p50["engine_stream"] - p50["detokenize"], 3)
    if "router_unix" in p50:
        p50["router_unix_rest_ms"] = round(p50["router_unix"] - p50["tokenize_stream_unix"] - p50["engine_stream"]
                                           - p50["detokenize_unix"], 3)
    return {"p50_ms": p50, "p90_ms": {name: round(percentile(v, 90) * 1e3, 3) for name, v in times.items()},
            "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO.parent / "shared" / "models" / "stories260k"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--blocks", type=int, default=512)
    parser.add_argument("--samples", type=int, default=60)
    parser.add_argument("--compare-tiers-from", default=None,
                        help="a checkout whose router and tokenizer are timed too (path router_base)")
    parser.add_argument("--compare-unix-tokenizer", action="store_true",
                        help="the tokenizer also on a unix socket: its hops and a router dialing it there, timed too")
    parser.add_argument("--out", default=None)
    parser.add_argument("--log-dir", default="/tmp/kvmesh-bench-ttft-hops")
    args = parser.parse_args()
    args.model = str(pathlib.Path(args.model).resolve())
    args.compare_per_request = args.compare_engine_stream = False
    args.router_workers = 1  # start_mesh's one router process (overhead.py measures --workers)
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    base = pathlib.Path(args.compare_tiers_from).resolve() if args.compare_tiers_from else None
    procs = start_mesh(args, pathlib.Path(args.log_dir), REPO, base)
    try:
        unix_socket = tokenizer_unix_socket(pathlib.Path(args.log_dir)) if args.compare_unix_tokenizer else None
        results = asyncio.run(measure({p.name: p for p in procs}, args.samples, unix_socket))
    finally:
        stop_all(procs)
    report = {"bench": "ttft_hops", **environment(args, REPO), "loadavg_at_start": load_at_start,
              **({"base_git_commit": tree_commit(base), "base_tree": str(base)} if base else {}),
              "model": pathlib.Path(args.model).name, "engine_device": args.device,
              "workload": {"prompt": PROMPT, "max_tokens": 1, "concurrency": 1,
                           "compare_unix_tokenizer": args.compare_unix_tokenizer}, "results": results}
    write_report(report, args.out)


if __name__ == "__main__":
    main()
