"""`python -m router.server`: the router process.

Start order: reach the tokenizer (GetInfo, retried until it answers), start discovery and one watcher
per engine, then serve. Health is SERVING while at least one engine is admissible, so `kvmesh up` and
Kubernetes readiness wait for a router that can answer; it follows the engines from then on.

With --http-port the same process also serves the OpenAI-compatible HTTP API (router.http) on its
event loop, over the same Orchestrator; it starts with the gRPC server and drains beside it.

With --workers N (N > 1) this process is a parent that runs N such routers on the same ports
(router.workers); each worker binds only once it can answer (see Router.start).
"""

from __future__ import annotations

import asyncio
import logging
import sys

import grpc

from kvmesh import telemetry
from kvmesh.serving import event_loop, heap
from kvmesh.serving.channels import create_channel
from kvmesh.serving.config import EnvArgumentParser, add_server_flags, configure_logging
from kvmesh.serving.reuseport import PortTaken
from kvmesh.serving.server import RunningServer, install_stop_signals, start_server, wait_for_stop, write_port_file
from kvmesh.telemetry.tracing import tracing_enabled
from kvmesh.v1 import common_pb2, router_pb2_grpc, tokenizer_pb2_grpc
from router.auth import BearerTokenInterceptor
from router.config import ConfigError, RouterConfig, add_router_flags, config_from_args
from router.deployment import Deployment
from router.discovery import Discovery
from router.drain import StreamDrain
from router.engines import Backoff, EnginePool
from router.kv_events import KvEventFollowers
from router.orchestrator import Orchestrator
from router.policy import make_policy
from router.prefix_index import PrefixIndex
from router.servicer import RouterServicer
from router.tokenizer_client import TokenizerClient
from router.workers import (add_worker_flags, check_worker_flags, is_worker, serve_workers, worker_log_prefix,
                            worker_ready_file)

log = logging.getLogger("router")

SERVICE_NAME = "kvmesh.v1.Router"
DEFAULT_PORT = 50051


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def server_credentials(config: RouterConfig) -> grpc.ServerCredentials | None:
    if config.tls_cert is None:
        return None
    ca = _read(config.tls_client_ca) if config.tls_client_ca else None
    return grpc.ssl_server_credentials([(_read(config.tls_key), _read(config.tls_cert))],
                                       root_certificates=ca, require_client_auth=ca is not None)


class Router:
    """The router's parts, wired. `start()` serves; `stop()` drains."""

    def __init__(self, config: RouterConfig, *, host: str, port: int, max_message_bytes: int, grace_s: float = 10.0,
                 reuse_port: bool = False):
        self.config = config
        self._reuse_port = reuse_port  # a worker of `--workers N`: binds the shared ports with SO_REUSEPORT
        self._host, self._port, self._max_message_bytes = host, port, max_message_bytes
        self._grace_s = grace_s
        self.running: RunningServer | None = None
        # Cache-aware routing: a prefix index per engine, fed by the engines' KV events.
        self.prefix_index = PrefixIndex(staleness_s=config.staleness_bound_s)
        self.kv_followers = (KvEventFollowers(self.prefix_index, heartbeat_ms=config.heartbeat_ms)
                             if config.policy == "cache_aware" else None)
        self.pool = EnginePool(staleness_bound_s=config.staleness_bound_s, max_message_bytes=max_message_bytes,
                               min_interval_ms=config.min_report_interval_ms, heartbeat_ms=config.heartbeat_ms,
                               on_change=self._on_pool_change, engine_stream=config.engine_stream)
        self.deployment = Deployment(config, self.pool)
        self._tokenizer_channel = create_channel(config.tokenizer, max_message_bytes=max_message_bytes)
        policy = make_policy(config.policy, queue_ratio=config.queue_ratio, prefix_index=self.prefix_index,
                             cache_weight=config.cache_weight, balance_requests=config.balance_requests)
        self.tokenizer = TokenizerClient(self._tokenizer_channel)
        self.orchestrator = Orchestrator(config=config, pool=self.pool, policy=policy, tokenizer=self.tokenizer,
                                         limits=self.deployment.limits)
        self.discovery = Discovery(config.engines, self.pool.set_addresses, config.dns_refresh_s)
        self._serving: bool | None = None
        self._can_serve = asyncio.Event()  # the tokenizer reached and an engine admissible
        self._draining = False
        self.streams = StreamDrain()
        self.http = None  # router.http.server.HttpFront when config.http_port is set

    def is_serving(self) -> bool:
        """True while health is SERVING (the HTTP front's /health answers the same)."""
        return bool(self._serving) and not self._draining

    async def _start_http(self) -> None:
        # Imported here: FastAPI and uvicorn load only when the HTTP front is on.
        from router.http.app import FrontParts, build_app
        from router.http.logprobs import TokenTexts
        from router.http.server import HttpFront

        parts = FrontParts(orchestrator=self.orchestrator, deployment=self.deployment,
                           token_texts=TokenTexts(tokenizer_pb2_grpc.TokenizerStub(self._tokenizer_channel)),
                           is_serving=self.is_serving, auth_token=self.config.auth_token)
        self.http = HttpFront(build_app(parts), host=self.config.http_host or self._host,
                              port=self.config.http_port, grace_s=self._grace_s, reuse_port=self._reuse_port)
        await self.http.start()

    def _on_pool_change(self) -> None:
        if self.kv_followers is not None:
            self.kv_followers.sync(self.pool.engines)
        serving = self.deployment.tokenizer is not None and bool(self.pool.ready())
        (self._can_serve.set if serving else self._can_serve.clear)()
        if self.running is not None and serving != self._serving:
            self._serving = serving
            log.info("health %s (%d ready engines)", "SERVING" if serving else "NOT_SERVING",
                     len(self.pool.ready()))
            asyncio.ensure_future(self.running.set_serving(serving))

    async def _reach_tokenizer(self) -> None:
        backoff = Backoff(max_s=2.0)
        while True:
            try:
                info = await self.tokenizer.stub.GetInfo(common_pb2.GetInfoRequest(), timeout=5.0)
                self.deployment.tokenizer = info
                # A traced request keeps its own DetokenizeStream: the tokenizer's span per request.
                if (self.config.detokenize == "shared" and "detokenize_sessions" in info.service.capabilities
                        and not tracing_enabled()):
                    self.tokenizer.use_shared_sessions()
                # A traced request keeps its Tokenize call (and the tokenizer's span of it) likewise.
                if "tokenize_stream" in info.service.capabilities and not tracing_enabled():
                    self.tokenizer.use_tokenize_stream()
                log.info("tokenizer %s; detokenization: %s", self.config.tokenizer,
                         "one shared DetokenizeSessions stream" if self.tokenizer.sessions
                         else "one DetokenizeStream per request")
                return
            except grpc.aio.AioRpcError as exc:
                log.warning("tokenizer %s not reachable yet: %s", self.config.tokenizer, exc.code().name)
                await asyncio.sleep(backoff.delay())

    async def start(self, *, listen_when_ready: bool = False) -> None:
        """Serve. One router binds first (a port clash fails at once; health says NOT_SERVING until an
        engine is admissible). A worker of `--workers N` (listen_when_ready) binds only once it can
        answer: the kernel hands new connections to every listening socket of the port, so a worker
        still starting would otherwise take its share of connections and refuse their requests."""
        if listen_when_ready:
            await self._connect()
            await self._can_serve.wait()
        servicer = RouterServicer(self.orchestrator, self.deployment, self.streams)
        interceptors = [BearerTokenInterceptor(self.config.auth_token)] if self.config.auth_token else []
        self.running = await start_server(
            register=lambda s: router_pb2_grpc.add_RouterServicer_to_server(servicer, s),
            service_names=[SERVICE_NAME], host=self._host, port=self._port,
            max_message_bytes=self._max_message_bytes, interceptors=interceptors,
            serving=self._can_serve.is_set(), credentials=server_credentials(self.config),
            reuse_port=self._reuse_port)
        self._serving = self._can_serve.is_set() or None
        if self.config.http_port is not None:
            await self._start_http()
        if listen_when_ready:
            self._on_pool_change()  # health as the pool is now: it may have moved while binding
        else:
            await self._connect()

    async def _connect(self) -> None:
        """Reach the tokenizer, then start following the engines; health follows from there."""
        await self._reach_tokenizer()
        await self.discovery.start()
        self._on_pool_change()

    async def drain(self, grace_s: float) -> None:
        """NOT_SERVING (health watches end); in-flight streams get grace_s, then a DRAINING error.
        The HTTP front drains beside the gRPC one, from the same moment."""
        self._draining = True
        http = asyncio.ensure_future(self.stop_http())
        if self.running is not None:
            await self.running.drain()
        await self.streams.drain(grace_s)
        await http

    async def stop(self, grace_s: float) -> None:
        """Drain, stop serving and release everything."""
        await self.drain(grace_s)
        if self.running is not None:
            await self.running.server.stop(1.0)
        await self.close()

    async def stop_http(self) -> None:
        """Drain the HTTP front (if on): no new connections, in-flight requests get the grace period."""
        self._draining = True
        if self.http is not None:
            await self.http.stop()

    async def close(self) -> None:
        if self.kv_followers is not None:
            await self.kv_followers.close()
        await self.discovery.stop()
        await self.pool.close()
        await self.tokenizer.close()
        await self._tokenizer_channel.close()


async def serve(args) -> None:
    config = config_from_args(args)
    worker = is_worker(args)
    # A worker's metrics go to the parent's /metrics (prometheus_client's multiprocess files).
    telemetry.setup("kvmesh-router", metrics_port=None if worker else args.metrics_port, host=args.host)
    router = Router(config, host=args.host, port=args.port, max_message_bytes=args.max_message_bytes,
                    grace_s=args.grace, reuse_port=worker)
    stop = asyncio.Event()
    install_stop_signals(stop)
    if worker:
        # A worker may be told to stop while it still waits for the tokenizer or an engine.
        starting = asyncio.ensure_future(router.start(listen_when_ready=True))
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([starting, stopped], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()  # wait_for_stop below waits for the signal itself
        if not starting.done():
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            await router.close()
            return
        starting.result()
        write_port_file(worker_ready_file(args), router.running.port)  # the parent writes the port files
    else:
        await router.start()
        if router.http is not None:
            write_port_file(args.http_port_file, router.http.port)
        write_port_file(args.port_file, router.running.port)
    # what startup built (grpc, OpenTelemetry, the HTTP front) lives as long as the process
    log.info("router ready; startup heap frozen (%d objects)", heap.freeze_startup_heap())
    try:
        await wait_for_stop(router.running, stop, args.grace, before_stop=lambda: router.drain(args.grace))
        await router.close()
    finally:
        heap.unfreeze_heap()


def build_parser() -> EnvArgumentParser:
    parser = EnvArgumentParser(prog="kvmesh-router", description="kvmesh router: the public endpoint")
    add_server_flags(parser, default_port=DEFAULT_PORT)
    add_router_flags(parser)
    add_worker_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, prefix=worker_log_prefix(args))
    try:
        config_from_args(args)  # a bad flag fails here once, not in every worker
        check_worker_flags(args)
        if args.workers > 1 and not is_worker(args):
            return serve_workers(args, argv)
        event_loop.run(serve(args))
    except (ConfigError, PortTaken) as exc:
        print(f"kvmesh-router: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
