"""bench/overhead.py's clients: the paths' calls, and the load spread over client processes.

One client process is itself a Python gRPC peer: through a router it receives one message per
response of every stream, on direct_stream one per engine step for all of them. At 64 streams on
a fast engine its own CPU caps the router path first (overhead.py records `client_cpu_us_per_token`).
With --client-procs N the streams of each phase are split over N spawned processes, each with its
own channels (its own connections), so that what is measured is the tiers, not the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import multiprocessing as mp
import os
import time

import grpc

from kvmesh.serving.channels import channel_options, create_channel
from kvmesh.v1 import common_pb2, engine_pb2, engine_pb2_grpc, router_pb2, router_pb2_grpc
from router.engine_stream import EngineStream

PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play"


async def _timed(stream) -> tuple[float | None, int, float, int]:
    """(time to the first token, tokens, end time, responses) of one stream; times are monotonic seconds."""
    first, n, responses = None, 0, 0
    async for resp in stream:
        if resp.tokens and first is None:
            first = time.monotonic()
        n += len(resp.tokens)
        responses += 1
    return first, n, time.monotonic(), responses


async def worker(call_fn, num_requests: int, samples: list) -> None:
    """One stream: `num_requests` requests one after another; a sample per request."""
    for _ in range(num_requests):
        sent = time.monotonic()
        first, n, end, responses = await _timed(call_fn())
        samples.append((first - sent, n, end - sent, responses))


async def open_paths(stack: contextlib.AsyncExitStack, addresses: dict[str, str], ids: list[int],
                     max_tokens: int, router_channels: int = 1) -> dict:
    """A call function per path on channels of this process: direct and direct_stream to
    addresses["engine"] (prompt as ids), and every other name in `addresses` but "engine" a router
    (prompt as text), its calls spread round-robin over `router_channels` channels, each its own TCP
    connection (a router's --workers share connections out, not calls)."""
    sampling = common_pb2.SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens)
    engine = engine_pb2_grpc.EngineStub(await stack.enter_async_context(create_channel(addresses["engine"])))
    paths = {"direct": lambda: engine.Generate(engine_pb2.GenerateRequest(prompt_token_ids=ids, sampling=sampling))}
    info = await engine.GetInfo(common_pb2.GetInfoRequest())
    if "generate_stream" in info.capabilities:  # the engine's cheapest client: one shared stream
        shared = EngineStream(engine)
        stack.push_async_callback(shared.close)
        numbers = itertools.count()
        prefix = f"direct-{os.getpid()}"  # unique across client processes
        paths["direct_stream"] = lambda: shared.start(engine_pb2.GenerateRequest(
            request_id=f"{prefix}-{next(numbers)}", prompt_token_ids=ids, sampling=sampling), None)
    request = router_pb2.RouterGenerateRequest(text=PROMPT, sampling=sampling, return_tokens=True)
    for name, address in addresses.items():
        if name != "engine":
            stubs = [router_pb2_grpc.RouterStub(await stack.enter_async_context(
                create_channel(address) if router_channels == 1 else _own_connection(address)))
                for _ in range(router_channels)]
            paths[name] = functools.partial(_round_robin, itertools.cycle(stubs), request)
    return paths


def _own_connection(address: str) -> grpc.aio.Channel:
    """A channel to `address` with a TCP connection of its own (grpc otherwise shares the connection
    of channels with equal arguments)."""
    return grpc.aio.insecure_channel(address, options=[*channel_options(), ("grpc.use_local_subchannel_pool", 1)])


def _round_robin(stubs, request):
    return next(stubs).Generate(request)


def _client_main(conn, addresses: dict[str, str], ids: list[int], max_tokens: int, router_channels: int) -> None:
    asyncio.run(_serve(conn, addresses, ids, max_tokens, router_channels))


async def _serve(conn, addresses, ids, max_tokens, router_channels) -> None:
    """Run the phases the parent asks for ((path, streams, requests per stream), None to stop);
    answer each with (samples, this process's CPU seconds)."""
    loop = asyncio.get_running_loop()
    async with contextlib.AsyncExitStack() as stack:
        paths = await open_paths(stack, addresses, ids, max_tokens, router_channels)
        conn.send(list(paths))
        while (command := await loop.run_in_executor(None, conn.recv)) is not None:
            name, streams, per_worker = command
            samples: list = []
            cpu = time.process_time()
            await asyncio.gather(*(worker(paths[name], per_worker, samples) for _ in range(streams)))
            conn.send((samples, time.process_time() - cpu))


class ClientPool:
    """N spawned client processes (spawn: this process already holds gRPC channels, which fork breaks)."""

    def __init__(self, num_procs: int, addresses: dict[str, str], ids: list[int], max_tokens: int,
                 router_channels: int = 1):
        ctx = mp.get_context("spawn")
        self._conns, self._procs = [], []
        for _ in range(num_procs):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_client_main, args=(child, addresses, ids, max_tokens, router_channels),
                               daemon=True)
            proc.start()
            self._conns.append(parent)
            self._procs.append(proc)
        self.paths = [self._ready(conn) for conn in self._conns][0]  # every process opened the same paths

    def _ready(self, conn, timeout_s: float = 120.0) -> list[str]:
        """The paths a client process opened; RuntimeError (after stopping them all) if it did not
        come up in time: a client that died would leave the benchmark waiting forever."""
        if not conn.poll(timeout_s):
            self.close()
            raise RuntimeError(f"a client process did not open its paths within {timeout_s:.0f} s")
        return conn.recv()

    async def run(self, name: str, streams: int, per_worker: int) -> tuple[list, float]:
        """One phase of `streams` streams split over the processes: (samples, their CPU seconds)."""
        loop = asyncio.get_running_loop()
        shares = [streams // len(self._conns) + (i < streams % len(self._conns)) for i in range(len(self._conns))]
        busy = [conn for conn, share in zip(self._conns, shares) if share]
        for conn, share in zip(busy, (s for s in shares if s)):
            conn.send((name, share, per_worker))
        answers = await asyncio.gather(*(loop.run_in_executor(None, conn.recv) for conn in busy))
        return [s for samples, _ in answers for s in samples], sum(cpu for _, cpu in answers)

    def close(self) -> None:
        for conn, proc in zip(self._conns, self._procs):
            with contextlib.suppress(OSError):
                conn.send(None)
            proc.join(10)
            if proc.is_alive():
                proc.kill()
