"""`kvmesh-engine`: the engine gRPC server process.

Startup: bind and listen at once (health NOT_SERVING, GetStatus answers), then on the engine thread
load weights, size and allocate the KV cache, compile/capture; then run one real warm-up generation
through the whole loop; only then READY and SERVING.
Shutdown (SIGTERM/SIGINT): DRAINING, NOT_SERVING, new requests get UNAVAILABLE, WatchLoad and health
Watch streams end; in-flight requests finish within --grace, the rest end with a DRAINING error; then
the server and the engine stop (exit 0). A fatal engine failure (engine_svc/watchdog.py) ends every
request with ENGINE_LOST and exits with EXIT_FATAL, for the supervisor to restart the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable

from kvmesh import telemetry
from kvmesh.serving import event_loop, heap
from kvmesh.serving.config import EnvArgumentParser, add_server_flags, configure_logging
from kvmesh.serving.server import (DEFAULT_MAX_MESSAGE_BYTES, RunningServer, install_stop_signals, start_server,
                                   wait_for_stop, write_port_file)
from kvmesh.v1 import common_pb2, engine_pb2_grpc

from engine_svc.config import KV_CACHE_DTYPES, ConfigError, EngineConfig
from engine_svc.core.hooks import EngineHooks
from engine_svc.core.request import ErrorKind, FinishReason, Request
from engine_svc.engine_loop import EngineLoop
from engine_svc.sampling_params import SamplingParams
from engine_svc.service import SERVICE_NAME, EngineService
from engine_svc.status import EngineStatusTracker, Phase
from engine_svc.telemetry_hooks import TelemetryHooks
from engine_svc.watchdog import DEFAULT_STEP_TIMEOUT_S, EXIT_FATAL, Watchdog

log = logging.getLogger("engine_svc")

DEFAULT_PORT = 50051
WARMUP_REQUEST_ID = "kvmesh-warmup"
ENGINE_JOIN_TIMEOUT_S = 10.0  # a hung engine thread is left behind (a daemon) after this


class EngineServer:
    """A listening engine server: ``await start()`` binds, ``await startup()`` makes it READY.

    Tests run it in-process; ``serve()`` wraps it for the command line.
    """

    def __init__(self, config: EngineConfig, *, host: str = "127.0.0.1", port: int = 0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, hooks: EngineHooks | None = None,
                 engine_id: str | None = None, runner_factory: Callable | None = None,
                 step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S):
        self.config = config.validate()
        self.host, self.port, self.max_message_bytes = host, port, max_message_bytes
        self.status = EngineStatusTracker()
        self.engine = EngineLoop(self.config, self.status, hooks=hooks, runner_factory=runner_factory)
        self.engine.on_fatal = self._on_fatal
        self.service = EngineService(self.engine, engine_id, hooks=hooks)
        self.running: RunningServer | None = None
        self.watchdog = Watchdog(self.engine.heartbeat, self.status, self._set_serving,
                                 lambda: self.engine.thread_alive, self.engine.fail, step_timeout_s)
        self.fatal_reason: str | None = None  # why the engine failed for good (the process exits non-zero)
        self.stop_requested = asyncio.Event()  # SIGTERM, or a fatal failure
        # Freeze the garbage collector's view of the heap once ready (the `kvmesh-engine` process
        # does; tests that start many servers in one process do not: gc.freeze is process-wide).
        self.freeze_gc = False

    async def start(self) -> int:
        """Bind and start serving RPCs (health NOT_SERVING). Returns the bound port."""
        self.running = await start_server(
            register=lambda s: engine_pb2_grpc.add_EngineServicer_to_server(self.service, s),
            service_names=[SERVICE_NAME], host=self.host, port=self.port,
            max_message_bytes=self.max_message_bytes, serving=False)
        self.port = self.running.port
        return self.port

    async def startup(self) -> None:
        """Load, size, compile (engine thread), warm up through the whole loop, then SERVING.

        Raises the startup failure after recording it in the status (phase FAILED).
        """
        try:
            await self.engine.start()
            self.service.start_kv_events()
            self.status.enter(Phase.ENGINE_PHASE_WARMING_UP, "one generation through the engine loop")
            await self._warmup()
        except BaseException as exc:
            self.status.fail(f"{type(exc).__name__}: {exc}")
            raise
        if self.freeze_gc:
            heap.freeze_startup_heap()  # what startup built lives as long as the process (kvmesh/serving/heap.py)
        self.status.enter(Phase.ENGINE_PHASE_READY, "serving")
        self.service.ready = True
        await self.running.set_serving(True)
        self.watchdog.start()
        log.info("engine ready: %s, %d KV blocks of %d tokens, max_model_len %d; startup %s",
                 self.engine.info.name, self.engine.num_blocks, self.config.block_size,
                 self.engine.max_model_len, self.status.phase_seconds())

    async def _warmup(self) -> None:
        """A real generation: prefill and decode steps through add -> step -> deliver -> stream."""
        info, max_len = self.engine.info, self.engine.max_model_len
        prompt_len = max(1, min(16, max_len - 4))
        prompt = [(7 * i + 1) % info.vocab_size for i in range(prompt_len)]
        params = SamplingParams(temperature=0.0, max_tokens=min(4, max_len - prompt_len), ignore_eos=True)
        req = Request(WARMUP_REQUEST_ID, prompt, params, use_prefix_cache=False)  # leaves no cached blocks
        last = None
        async for last in self.service.stream(req):
            pass
        if last is None or last.finish_reason != common_pb2.FINISH_REASON_LENGTH:
            raise RuntimeError(f"warm-up generation did not complete: {last}")

    async def _set_serving(self, serving: bool) -> None:
        if self.running is not None:
            await self.running.set_serving(serving and not self.service.draining)

    def _on_fatal(self, reason: str) -> None:
        """The engine cannot go on: NOT_SERVING at once (routers eject it), FAILED, then stop."""
        if self.fatal_reason is not None:
            return
        self.fatal_reason = reason
        log.critical("engine failed: %s; exiting with status %d", reason, EXIT_FATAL)
        self.status.fail(reason)
        self.service.ready = False
        if self.running is not None:
            asyncio.ensure_future(self.running.drain())
        self.stop_requested.set()

    async def drain(self, grace_s: float) -> None:
        """Stop taking requests; let in-flight ones finish for grace_s, end the rest, stop the engine."""
        if self.status.phase == Phase.ENGINE_PHASE_READY:
            self.status.enter(Phase.ENGINE_PHASE_DRAINING, f"finishing {self.engine.num_live} request(s)")
        self.service.start_draining()
        self.engine.republish()  # watchers see draining=True now, not at the next heartbeat
        if self.running is not None:
            await self.running.drain()  # NOT_SERVING; health watches end
        if self.engine.load is not None and not await self.engine.wait_idle(grace_s):
            log.warning("drain grace of %.1fs ran out: ending %d request(s)", grace_s, self.engine.num_live)
            self.engine.abort_all(FinishReason.ERROR, "the engine is shutting down (drain grace ran out)",
                                  ErrorKind.DRAINING)
            if not await self.engine.wait_idle(5.0):  # the engine thread does not answer: hung
                self.engine.fail("the engine is shutting down and its engine thread does not respond")

    async def run_until_stopped(self, grace_s: float, install_signals: bool = True) -> int:
        """Start up and serve until SIGTERM/SIGINT or `stop_requested`; drain; return the exit status."""
        stop = self.stop_requested
        if install_signals:
            install_stop_signals(stop)
        startup = asyncio.create_task(self.startup())
        startup.add_done_callback(lambda t: t.cancelled() or t.exception() is None or stop.set())
        await wait_for_stop(self.running, stop, grace_s, before_stop=lambda: self.drain(grace_s))
        await self.watchdog.stop()
        await self.service.close()
        await self.engine.stop(ENGINE_JOIN_TIMEOUT_S)
        self._unfreeze_gc()
        if self.fatal_reason is not None:
            return EXIT_FATAL
        if startup.done() and not startup.cancelled() and startup.exception() is not None:
            log.error("startup failed: %s", startup.exception())
            return 1
        startup.cancel()
        return 0

    async def stop(self, grace_s: float = 0.0) -> None:
        """Drain, then stop the gRPC server and the engine thread."""
        await self.drain(grace_s)
        await self.watchdog.stop()
        if self.running is not None:
            await self.running.server.stop(1.0)
        await self.service.close()
        await self.engine.stop(ENGINE_JOIN_TIMEOUT_S)
        self._unfreeze_gc()

    def _unfreeze_gc(self) -> None:
        if self.freeze_gc:
            heap.unfreeze_heap()


def build_parser() -> argparse.ArgumentParser:
    p = EnvArgumentParser(prog="kvmesh-engine", description="kvmesh engine: paged-KV continuous batching over gRPC")
    add_server_flags(p, default_port=DEFAULT_PORT)
    d = EngineConfig()
    p.add_argument("--model", default=d.model, help="HF model directory (config.json + safetensors) or 'demo'")
    p.add_argument("--device", default=d.device, help="cpu, cuda or cuda:N")
    p.add_argument("--load-format", default=d.load_format, choices=["auto", "dummy"],
                   help="auto = safetensors from --model; dummy = random weights in config.json's shape")
    p.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16", "float16"],
                   help="weight and activation dtype; auto = the checkpoint's (float32 on CPU)")
    p.add_argument("--seed", type=int, default=d.seed, help="seeds dummy weights and unseeded sampling")
    p.add_argument("--block-size", type=int, default=d.block_size, help="tokens per KV block")
    p.add_argument("--max-model-len", type=int, default=None, help="longest prompt + output (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help="sequences per step at most")
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
                   help="tokens per step at most (the scheduler's token budget)")
    p.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction,
                   default=d.enable_chunked_prefill, help="split long prompts across steps")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=d.enable_prefix_caching,
                   help="reuse the KV blocks of cached prompt prefixes across requests (automatic prefix caching)")
    p.add_argument("--kv-cache-memory", type=int, default=None, help="bytes for the KV cache (CPU default 256 MiB)")
    p.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization,
                   help="fraction of GPU memory for weights, activations and the KV cache")
    p.add_argument("--num-gpu-blocks-override", type=int, default=None, help="force the number of KV blocks")
    p.add_argument("--enforce-eager", action="store_true", help="CUDA: no CUDA-graph capture")
    p.add_argument("--mixed-graph-max-tokens", type=int, default=d.mixed_graph_max_tokens,
                   help="CUDA: prefill/mixed steps of up to this many tokens replay piecewise CUDA graphs "
                        "(attention eager between them); 0 = run them eagerly")
    p.add_argument("--kv-cache-dtype", default=d.kv_cache_dtype, choices=list(KV_CACHE_DTYPES),
                   help="KV cache element type: auto = the model's dtype; fp8 = e4m3 (half the bytes per block)")
    p.add_argument("--cpu-threads", type=int, default=0,
                   help="torch intra-op threads (0 = torch's default, one per core); several CPU engines "
                        "on one host run far faster with 1 each than oversubscribed")
    p.add_argument("--engine-id", default=None, help="id in load reports (default: engine-<pid>-<random>)")
    p.add_argument("--step-timeout", type=float, default=DEFAULT_STEP_TIMEOUT_S,
                   help="seconds a model step may run before the watchdog marks the engine stalled (NOT_SERVING)")
    return p


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model, device=args.device, dtype=args.dtype, load_format=args.load_format, seed=args.seed,
        block_size=args.block_size, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, enable_chunked_prefill=args.enable_chunked_prefill,
        enable_prefix_caching=args.enable_prefix_caching,
        kv_cache_memory=args.kv_cache_memory, gpu_memory_utilization=args.gpu_memory_utilization,
        num_gpu_blocks_override=args.num_gpu_blocks_override, enforce_eager=args.enforce_eager,
        mixed_graph_max_tokens=args.mixed_graph_max_tokens, kv_cache_dtype=args.kv_cache_dtype).validate()


async def serve(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT (exit 0), a startup failure (exit 1) or a fatal engine failure (EXIT_FATAL)."""
    telemetry.setup("kvmesh-engine", metrics_port=args.metrics_port, host=args.host)
    if args.cpu_threads > 0:
        import torch  # the engine thread imports it anyway; process-wide setting
        torch.set_num_threads(args.cpu_threads)
    config = config_from_args(args)
    hooks = TelemetryHooks(os.path.basename(config.model.rstrip("/")))  # request events, step spans, metrics
    server = EngineServer(config, host=args.host, port=args.port, max_message_bytes=args.max_message_bytes,
                          engine_id=args.engine_id, hooks=hooks, step_timeout_s=args.step_timeout)
    hooks.bind(server.service.engine_id, lambda: server.engine.load)
    server.freeze_gc = True
    port = await server.start()
    write_port_file(args.port_file, port)
    return await server.run_until_stopped(args.grace)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        code = event_loop.run(serve(args))
    except ConfigError as err:
        log.error("configuration error: %s", err)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
