"""The floor under the router and tokenizer tiers: what one Python grpc.aio hop costs on this host,
with no kvmesh code in it.

    python bench/grpc_floor.py --out bench/results/grpc-floor-<device>-<date>.json

Measurements, each between processes on loopback, as the tiers run:
- round trips: a unary call, and one message pair on an open bidirectional stream (the shape of
  the shared DetokenizeSessions stream), paced a few milliseconds apart as one stream's requests
  are; p50 latency and the server's CPU per call;
- a bare relay: a backend streams one GenerateResponse per "step" to each of N streams, a proxy
  turns each into a RouterGenerateResponse and streams it on to the client, nothing else (no
  tokenizer, no choice of engine, no bookkeeping). Its CPU per token is the least any router hop
  in Python grpc can cost; the backend's is what an engine pays to stream a token;
- for comparison, the message pair with no gRPC: length-prefixed protobuf on a plain asyncio
  stream (`raw_socket_pair_rtt_p50_ms`, the server's CPU per pair);
- the same relay with the backend -> proxy hop multiplexed: one backend message per step carries
  that step's token of every stream (what one engine -> router stream per channel would cost),
  the proxy fans them out to the clients' streams as before.
Each measurement runs for the channel-option sets given (kvmesh's own by default), on each transport
given: loopback TCP (the default), or unix-domain sockets (`--transports tcp,unix`: what co-located
tiers can use instead).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import multiprocessing as mp
import os
import pathlib
import socket
import statistics
import sys
import tempfile
import time

import grpc

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.provenance import cpu_name, git_commit, write_report  # noqa: E402
from kvmesh.serving import event_loop  # noqa: E402
from kvmesh.serving.channels import channel_options  # noqa: E402
from kvmesh.serving.server import DEFAULT_MAX_MESSAGE_BYTES, server_options  # noqa: E402
from kvmesh.v1 import engine_pb2, router_pb2, tokenizer_pb2  # noqa: E402

OPTION_SETS = {
    "kvmesh": (server_options(DEFAULT_MAX_MESSAGE_BYTES), channel_options()),
    "grpc_defaults": ([], []),
    "latency": ([("grpc.optimization_target", "latency")], [("grpc.optimization_target", "latency")]),
    "no_retries": ([], [("grpc.enable_retries", 0)]),
}


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _handler(service: str, method: str, kind, fn, request_cls, response_cls):
    return grpc.method_handlers_generic_handler(service, {method: kind(
        fn, request_deserializer=request_cls.FromString, response_serializer=response_cls.SerializeToString)})


def bind_address(transport: str, name: str) -> str:
    """Where a server of this bench listens: a free loopback port, or a unix socket in a fresh directory."""
    if transport == "unix":
        return f"unix:{tempfile.mkdtemp(prefix='grpc-floor-')}/{name}.sock"
    assert transport == "tcp", transport
    return "127.0.0.1:0"


async def _serve(handlers, options, port_queue, address: str) -> None:
    """Serve on `address` (bind_address); put the target a client dials on the queue."""
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers(handlers)
    port = server.add_insecure_port(address)
    port_queue.put(address if address.startswith("unix:") else f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def echo_server(port_queue, address: str, options) -> None:
    """Unary and bidi echo of a small message."""
    req, resp = tokenizer_pb2.DetokenizeStreamRequest, tokenizer_pb2.DetokenizeStreamResponse

    async def unary(request, context):
        return resp(text="x")

    async def bidi(requests, context):
        async for _ in requests:
            yield resp(text="x")
    event_loop.run(_serve([_handler("t.Echo", "Unary", grpc.unary_unary_rpc_method_handler, unary, req, resp),
                        _handler("t.Echo", "Bidi", grpc.stream_stream_rpc_method_handler, bidi, req, resp)],
                       options, port_queue, address))


def raw_echo_server(port_queue, address: str) -> None:
    """The same echo with no gRPC: length-prefixed protobuf messages on a plain asyncio stream (the
    least a round trip between two Python processes can cost on this host, for comparison)."""
    req, resp = tokenizer_pb2.DetokenizeStreamRequest, tokenizer_pb2.DetokenizeStreamResponse

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                size = int.from_bytes(await reader.readexactly(4), "little")
                req.FromString(await reader.readexactly(size))
                out = resp(text="x").SerializeToString()
                writer.write(len(out).to_bytes(4, "little") + out)

    async def main() -> None:
        if address.startswith("unix:"):
            server = await asyncio.start_unix_server(echo, path=address.removeprefix("unix:"))
            port_queue.put(address)
        else:
            server = await asyncio.start_server(echo, "127.0.0.1", 0)
            port_queue.put(f"127.0.0.1:{server.sockets[0].getsockname()[1]}")
        async with server:
            await server.serve_forever()
    event_loop.run(main())


async def _raw_round_trips(target: str, n: int, pace_s: float) -> float:
    """p50 ms of a message pair on raw_echo_server's stream."""
    if target.startswith("unix:"):
        reader, writer = await asyncio.open_unix_connection(target.removeprefix("unix:"))
    else:
        host, port = target.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family != socket.AF_UNIX:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as gRPC sets it
    msg = tokenizer_pb2.DetokenizeStreamRequest(finish=True).SerializeToString()
    frame = len(msg).to_bytes(4, "little") + msg
    times = []
    for i in range(n + 50):  # the first 50 warm up
        t = time.perf_counter()
        writer.write(frame)
        size = int.from_bytes(await reader.readexactly(4), "little")
        tokenizer_pb2.DetokenizeStreamResponse.FromString(await reader.readexactly(size))
        if i >= 50:
            times.append(time.perf_counter() - t)
        await asyncio.sleep(pace_s)
    writer.close()
    return round(statistics.median(times) * 1e3, 3)


def backend_server(port_queue, address: str, options, num_tokens: int, step_s: float) -> None:
    """An engine stand-in: one token per step on every stream."""
    async def generate(request, context):
        for i in range(num_tokens):
            await asyncio.sleep(step_s)
            out = engine_pb2.GenerateResponse(request_id=request.request_id)
            out.tokens.add(id=300 + i, index=i)
            yield out
    event_loop.run(_serve([_handler("kvmesh.v1.Engine", "Generate", grpc.unary_stream_rpc_method_handler, generate,
                                 engine_pb2.GenerateRequest, engine_pb2.GenerateResponse)], options, port_queue, address))


def backend_mux_server(port_queue, address: str, options, num_tokens: int, step_s: float) -> None:
    """The multiplexed engine stand-in: one message per step with a token for each of `streams`
    streams (Token.index names the stream; the request's max_tokens says how many streams)."""
    async def generate(request, context):
        for i in range(num_tokens):
            await asyncio.sleep(step_s)
            out = engine_pb2.GenerateResponse()
            for stream in range(request.sampling.max_tokens):
                out.tokens.add(id=300 + i, index=stream)
            yield out
    event_loop.run(_serve([_handler("kvmesh.v1.Engine", "Generate", grpc.unary_stream_rpc_method_handler, generate,
                                 engine_pb2.GenerateRequest, engine_pb2.GenerateResponse)], options, port_queue, address))


def proxy_mux_server(port_queue, address: str, options, channel_opts, backend_target: str) -> None:
    """The router stand-in over the multiplexed backend. A client's request_id is "i/n" (stream i of
    n starting together); once all n are in, one backend stream serves them and a reader task fans
    its tokens out to their inboxes."""
    async def main():
        channel = grpc.aio.insecure_channel(backend_target, options=channel_opts)
        backend = channel.unary_stream("/kvmesh.v1.Engine/Generate",
                                       request_serializer=engine_pb2.GenerateRequest.SerializeToString,
                                       response_deserializer=engine_pb2.GenerateResponse.FromString)
        gathering: dict[int, asyncio.Queue] = {}
        readers: set[asyncio.Task] = set()

        async def fan_out(inboxes: dict[int, asyncio.Queue]) -> None:
            request = engine_pb2.GenerateRequest()
            request.sampling.max_tokens = len(inboxes)
            async for resp in backend(request):
                for token in resp.tokens:
                    inboxes[token.index].put_nowait(token)
            for inbox in inboxes.values():
                inbox.put_nowait(None)

        async def generate(request, context):
            stream, count = map(int, request.request_id.split("/"))
            inbox = gathering[stream] = asyncio.Queue()
            if len(gathering) == count:
                task = asyncio.create_task(fan_out(dict(gathering)))
                readers.add(task)
                task.add_done_callback(readers.discard)
                gathering.clear()
            while (token := await inbox.get()) is not None:
                out = router_pb2.RouterGenerateResponse(request_id=request.request_id, text="tok")
                out.tokens.append(token)
                yield out
        await _serve([_handler("kvmesh.v1.Router", "Generate", grpc.unary_stream_rpc_method_handler, generate,
                               router_pb2.RouterGenerateRequest, router_pb2.RouterGenerateResponse)], options, port_queue, address)
    event_loop.run(main())


def proxy_server(port_queue, address: str, options, channel_opts, backend_target: str) -> None:
    """A router stand-in: each backend response becomes one client response, nothing else."""
    async def main():
        channel = grpc.aio.insecure_channel(backend_target, options=channel_opts)
        backend = channel.unary_stream("/kvmesh.v1.Engine/Generate",
                                       request_serializer=engine_pb2.GenerateRequest.SerializeToString,
                                       response_deserializer=engine_pb2.GenerateResponse.FromString)

        async def generate(request, context):
            async for resp in backend(engine_pb2.GenerateRequest(request_id=request.request_id)):
                out = router_pb2.RouterGenerateResponse(request_id=request.request_id, text="tok")
                out.tokens.extend(resp.tokens)
                yield out
        await _serve([_handler("kvmesh.v1.Router", "Generate", grpc.unary_stream_rpc_method_handler, generate,
                               router_pb2.RouterGenerateRequest, router_pb2.RouterGenerateResponse)], options, port_queue, address)
    event_loop.run(main())


def _start(target, address: str, *args) -> tuple[mp.Process, str]:
    """A server process on `address` (bind_address); returns it and the target to dial."""
    queue = mp.Queue()
    proc = mp.Process(target=target, args=(queue, address, *args), daemon=True)
    proc.start()
    return proc, queue.get(timeout=60)


async def _round_trips(target: str, channel_opts, n: int, pace_s: float) -> dict:
    req = tokenizer_pb2.DetokenizeStreamRequest(finish=True)
    ser, de = tokenizer_pb2.DetokenizeStreamRequest.SerializeToString, tokenizer_pb2.DetokenizeStreamResponse.FromString
    async with grpc.aio.insecure_channel(target, options=channel_opts) as channel:
        unary = channel.unary_unary("/t.Echo/Unary", request_serializer=ser, response_deserializer=de)
        bidi = channel.stream_stream("/t.Echo/Bidi", request_serializer=ser, response_deserializer=de)
        for _ in range(50):  # connection, caches
            await unary(req)
        unary_s, pair_s = [], []
        for _ in range(n):
            t = time.perf_counter()
            await unary(req)
            unary_s.append(time.perf_counter() - t)
            await asyncio.sleep(pace_s)
        call = bidi()
        for _ in range(n):
            t = time.perf_counter()
            await call.write(req)
            await call.read()
            pair_s.append(time.perf_counter() - t)
            await asyncio.sleep(pace_s)
        call.cancel()
    return {"unary_rtt_p50_ms": round(statistics.median(unary_s) * 1e3, 3),
            "bidi_message_pair_rtt_p50_ms": round(statistics.median(pair_s) * 1e3, 3)}


async def _relay_client(target: str, channel_opts, streams: int) -> int:
    async with grpc.aio.insecure_channel(target, options=channel_opts) as channel:
        generate = channel.unary_stream("/kvmesh.v1.Router/Generate",
                                        request_serializer=router_pb2.RouterGenerateRequest.SerializeToString,
                                        response_deserializer=router_pb2.RouterGenerateResponse.FromString)

        async def one(i: int, n: int) -> int:
            request = router_pb2.RouterGenerateRequest(request_id=f"{i}/{n}")
            return sum([len(r.tokens) async for r in generate(request)])
        await one(0, 1)  # warm up
        return sum(await asyncio.gather(*(one(i, streams) for i in range(streams))))


def _relay(args, transport: str, server_opts, channel_opts, backend_target, proxy_target) -> dict:
    """CPU per token of a backend and a proxy relaying `args.streams` streams to this process."""
    backend, backend_at = _start(backend_target, bind_address(transport, "backend"), server_opts, args.tokens,
                                 args.step_ms / 1e3)
    proxy, proxy_at = _start(proxy_target, bind_address(transport, "proxy"), server_opts, channel_opts, backend_at)
    try:
        time.sleep(0.3)
        cpu_before = {"proxy": cpu_seconds(proxy.pid), "backend": cpu_seconds(backend.pid)}
        start = time.monotonic()
        tokens = event_loop.run(_relay_client(proxy_at, channel_opts, args.streams))
        wall = time.monotonic() - start
        return {"streams": args.streams, "tokens": tokens, "wall_s": round(wall, 3),
                "proxy_cpu_us_per_token": round(1e6 * (cpu_seconds(proxy.pid) - cpu_before["proxy"]) / tokens, 1),
                "backend_cpu_us_per_token": round(1e6 * (cpu_seconds(backend.pid) - cpu_before["backend"]) / tokens, 1)}
    finally:
        proxy.kill()
        backend.kill()


def measure(name: str, loop: str, transport: str, args) -> dict:
    """One option set on one event loop and transport (every process of the measurement: forked after the choice)."""
    os.environ[event_loop.EVENT_LOOP_ENV] = loop
    server_opts, channel_opts = OPTION_SETS[name]
    echo, echo_at = _start(echo_server, bind_address(transport, "echo"), server_opts)
    try:
        time.sleep(0.3)
        before = cpu_seconds(echo.pid)
        rtts = event_loop.run(_round_trips(echo_at, channel_opts, args.round_trips, args.pace_ms / 1e3))
        rtts["server_cpu_us_per_call"] = round(1e6 * (cpu_seconds(echo.pid) - before) / (2 * args.round_trips), 1)
    finally:
        echo.kill()
    raw, raw_at = _start(raw_echo_server, bind_address(transport, "raw"))
    try:
        time.sleep(0.3)
        before = cpu_seconds(raw.pid)
        rtts["raw_socket_pair_rtt_p50_ms"] = event_loop.run(_raw_round_trips(raw_at, args.round_trips,
                                                                             args.pace_ms / 1e3))
        rtts["raw_server_cpu_us_per_pair"] = round(1e6 * (cpu_seconds(raw.pid) - before) / args.round_trips, 1)
    finally:
        raw.kill()
    relay = _relay(args, transport, server_opts, channel_opts, backend_server, proxy_server)
    relay_mux = _relay(args, transport, server_opts, channel_opts, backend_mux_server, proxy_mux_server)
    result = {"options": name, "event_loop": event_loop.loop_name(), "transport": transport, **rtts, "relay": relay, "relay_multiplexed_backend": relay_mux,
              "loadavg_1m": round(os.getloadavg()[0], 2)}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--options", default="kvmesh,grpc_defaults,latency,no_retries",
                        help=f"channel-option sets, in order: {', '.join(OPTION_SETS)}")
    parser.add_argument("--loops", default="asyncio", help="event loops, in order: asyncio, uvloop")
    parser.add_argument("--transports", default="tcp",
                        help="tcp (loopback), unix (a unix-domain socket: co-located tiers), in order")
    parser.add_argument("--repeats", type=int, default=2, help="passes over the option sets (noise shows as spread)")
    parser.add_argument("--round-trips", type=int, default=300)
    parser.add_argument("--pace-ms", type=float, default=2.0, help="pause between round trips")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per relayed stream")
    parser.add_argument("--step-ms", type=float, default=30.0, help="the backend's time between tokens of a stream")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    names = args.options.split(",")
    load_at_start = round(os.getloadavg()[0], 2)
    runs = [measure(name, loop, transport, args) for _ in range(args.repeats) for name in names
            for loop in args.loops.split(",") for transport in args.transports.split(",")]
    report = {"bench": "grpc_floor", "device": f"cpu: {cpu_name()} x{os.cpu_count()}",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "git_commit": git_commit(), "python": sys.version.split()[0], "grpcio": grpc.__version__,
              "loadavg_1m_at_start": load_at_start,
              "workload": {"round_trips": args.round_trips, "pace_ms": args.pace_ms, "streams": args.streams,
                           "tokens": args.tokens, "step_ms": args.step_ms},
              "runs": runs}
    write_report(report, args.out)


if __name__ == "__main__":
    main()
