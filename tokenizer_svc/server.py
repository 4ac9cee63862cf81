"""`kvmesh-tokenizer` / `python -m tokenizer_svc.server`: serve kvmesh.v1.Tokenizer.

    kvmesh-tokenizer --model DIR|demo --port 50052

Health is SERVING as soon as the tokenizer is loaded (it loads before the port opens). SIGTERM or
SIGINT drains: NOT_SERVING first, then in-flight RPCs get --grace seconds.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from kvmesh import telemetry
from kvmesh.serving import event_loop, heap
from kvmesh.serving.config import EnvArgumentParser, add_server_flags, configure_logging
from kvmesh.serving.server import (RunningServer, install_stop_signals, start_server, wait_for_stop,
                                   write_port_file)
from kvmesh.v1 import tokenizer_pb2_grpc
from tokenizer_svc.limits import TokenizerLimits
from tokenizer_svc.loader import LoadedTokenizer, load_tokenizer
from tokenizer_svc.service import SERVICE_NAME, TokenizerServicer

log = logging.getLogger("tokenizer_svc")

DEFAULT_PORT = 50052


def build_parser() -> EnvArgumentParser:
    parser = EnvArgumentParser(prog="kvmesh-tokenizer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo",
                        help="HuggingFace model directory (tokenizer.json, or tokenizer.model), or 'demo' (built in)")
    add_server_flags(parser, default_port=DEFAULT_PORT)
    defaults = TokenizerLimits()
    parser.add_argument("--max-text-bytes", type=int, default=defaults.max_text_bytes,
                        help="largest Tokenize text, in UTF-8 bytes")
    parser.add_argument("--max-ids-per-request", type=int, default=defaults.max_ids_per_request,
                        help="most ids in a Detokenize request, a stream's prompt, or one stream batch")
    parser.add_argument("--max-stop-strings", type=int, default=defaults.max_stop_strings,
                        help="most stop strings per DetokenizeStream")
    parser.add_argument("--max-stop-string-bytes", type=int, default=defaults.max_stop_string_bytes,
                        help="longest stop string, in UTF-8 bytes")
    parser.add_argument("--max-sessions-per-stream", type=int, default=defaults.max_sessions_per_stream,
                        help="most detokenize sessions open at once on one DetokenizeSessions stream")
    parser.add_argument("--unix-socket", default=None,
                        help="also listen on this unix-domain socket (co-located clients dial unix:PATH); off when absent")
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1),
                        help="threads for tokenizer work (encode, decode, chat templates)")
    return parser


def limits_from_args(args) -> TokenizerLimits:
    return TokenizerLimits(max_text_bytes=args.max_text_bytes, max_ids_per_request=args.max_ids_per_request,
                           max_stop_strings=args.max_stop_strings, max_stop_string_bytes=args.max_stop_string_bytes,
                           max_sessions_per_stream=args.max_sessions_per_stream)


async def serve_tokenizer(tok: LoadedTokenizer, limits: TokenizerLimits, *, host: str = "127.0.0.1", port: int = 0,
                          max_message_bytes: int = 16 * 1024 * 1024, threads: int = 2,
                          unix_socket: str | None = None) -> tuple[RunningServer, ThreadPoolExecutor]:
    """Start a tokenizer server for an already loaded tokenizer (also used by tests and the benchmark).
    The caller stops the server, then shuts the executor down."""
    executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tokenizer")
    servicer = TokenizerServicer(tok, limits, executor)
    running = await start_server(
        register=lambda server: tokenizer_pb2_grpc.add_TokenizerServicer_to_server(servicer, server),
        service_names=[SERVICE_NAME], host=host, port=port, max_message_bytes=max_message_bytes,
        unix_socket=unix_socket)
    return running, executor


async def serve(args) -> None:
    limits = limits_from_args(args)
    telemetry.setup("kvmesh-tokenizer", metrics_port=args.metrics_port, host=args.host)
    log.info("loading tokenizer %s", args.model)
    try:
        tok = await asyncio.to_thread(load_tokenizer, args.model)
    except (OSError, ValueError) as exc:
        # A wrong --model is an operator error: say what is wrong, exit non-zero, no traceback.
        log.error("cannot load tokenizer %s: %s", args.model, exc)
        raise SystemExit(2) from None
    running, executor = await serve_tokenizer(tok, limits, host=args.host, port=args.port,
                                              max_message_bytes=args.max_message_bytes, threads=args.threads,
                                              unix_socket=args.unix_socket)
    stop = asyncio.Event()
    install_stop_signals(stop)
    frozen = heap.freeze_startup_heap()  # a full collection would walk transformers (kvmesh/serving/heap.py)
    write_port_file(args.port_file, running.port)
    log.info("tokenizer %s ready: vocab %d, eos %s, chat template %s; startup heap frozen (%d objects)", tok.name,
             tok.vocab_size, tok.eos_token_ids, tok.has_chat_template, frozen)
    try:
        await wait_for_stop(running, stop, args.grace)
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
        heap.unfreeze_heap()


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        limits_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    configure_logging(args.log_level)
    event_loop.run(serve(args))


if __name__ == "__main__":
    main()
