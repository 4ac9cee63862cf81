"""One Generate request through the mesh: tokenize, choose an engine, stream, detokenize, stop.

The rule, stated first: a request commits to an engine when that engine answers with its first
response. Until then any engine failure is invisible to the client (the request is re-dispatched to
another replica, at most `max_attempts` engines in all); after it, a failure ends the stream with
one response carrying a StreamError, and nothing is resent.

Every exit path (finish, stop string, client cancel, deadline, error) runs the same `finally`: the
engine call is cancelled if still open (the engine aborts at its next step boundary and frees the
request's blocks), the detokenize stream is cancelled, the request's pending blocks are released.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable

import grpc
from opentelemetry import trace

from kvmesh.serving.errors import AlreadyExists, ResourceExhausted, Unavailable
from kvmesh.telemetry.attributes import EVENT_ROUTE_DECISION
from kvmesh.telemetry.router import record_pick
from kvmesh.v1 import common_pb2, engine_pb2, router_pb2
from router.capacity import too_large_error
from router.config import RouterConfig
from router.engines import EnginePool
from router.policy import Decision, Policy, PromptKey
from router.stream import CommittedStream
from router.tokenizer_client import DetokenizeCall, TokenizerClient, downstream_error
from router.validation import RequestLimits, check_request, resolve_max_tokens

log = logging.getLogger(__name__)

# Engine statuses before the first response that mean "try another replica".
_FAILOVER_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                   grpc.StatusCode.UNKNOWN}


def record_decision(decision: Decision) -> None:
    """Default decision hook: a span event on the current span (when it records), the pick metrics
    and a debug log."""
    span = trace.get_current_span()
    if span.is_recording():  # the attributes cost more than the whole choice: build them only if kept
        span.add_event(EVENT_ROUTE_DECISION, decision.attributes())
    record_pick(decision)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("route %s -> %s (%s) %s", decision.request_id, decision.chosen, decision.reason,
                  [(s.candidate.address, s.candidate.free_blocks, s.candidate.reserved_blocks,
                    s.candidate.waiting_tokens, s.candidate.pending_blocks, s.matched_blocks, s.score)
                   for s in decision.scored])


async def _start_detokenizer(detok: DetokenizeCall, prompt: list[int], req) -> grpc.aio.AioRpcError | None:
    """Send the detokenizer its start message; the error, if any, is returned for the caller to raise."""
    try:
        await detok.start(prompt, req)
    except grpc.aio.AioRpcError as exc:
        return exc
    return None


def _engine_failed(first: engine_pb2.GenerateResponse) -> bool:
    """The engine's first answer ends the request with ENGINE_LOST before any token: fail over."""
    return (first.finish_reason == common_pb2.FINISH_REASON_ERROR and not first.tokens
            and first.error.reason == common_pb2.ERROR_REASON_ENGINE_LOST)


class _Deadline:
    def __init__(self, remaining_s: float | None):
        self._at = None if remaining_s is None else time.monotonic() + remaining_s

    def remaining(self) -> float | None:
        """Seconds left for downstream calls (None = no deadline)."""
        return None if self._at is None else max(0.001, self._at - time.monotonic())


class Orchestrator:
    """Runs Generate requests. One per router process; request state lives in the request's coroutine."""

    def __init__(self, *, config: RouterConfig, pool: EnginePool, policy: Policy, tokenizer: TokenizerClient,
                 limits: Callable[[], RequestLimits], on_decision: Callable[[Decision], None] = record_decision,
                 rng: random.Random | None = None):
        self._config = config
        self._pool = pool
        self._policy = policy
        self._tokenizer = tokenizer
        self._limits = limits
        self.on_decision = on_decision  # the observability hook: gets every Decision, attempts included
        self._rng = rng or random.Random()
        self._live: set[str] = set()

    @property
    def num_open_streams(self) -> int:
        return len(self._live)

    async def generate(self, req: router_pb2.RouterGenerateRequest,
                       remaining_s: float | None) -> AsyncIterator[router_pb2.RouterGenerateResponse]:
        """Stream the responses of one request. Raises ServiceError before the first response."""
        request_id = req.request_id or uuid.uuid4().hex
        if request_id in self._live:
            raise AlreadyExists(f"request_id {request_id!r} is already live")
        if len(self._live) >= self._config.max_concurrent_streams:
            raise ResourceExhausted(f"{len(self._live)} streams open; at most {self._config.max_concurrent_streams}",
                                    retry_after_s=self._config.retry_after_s)
        self._live.add(request_id)
        try:
            async with contextlib.aclosing(self._generate(request_id, req, _Deadline(remaining_s))) as responses:
                async for out in responses:
                    yield out
        finally:
            self._live.discard(request_id)

    async def _generate(self, request_id, req, deadline):
        limits = self._limits()
        check_request(req, limits)
        prompt = await self._tokenizer.prompt_ids(req, deadline.remaining())
        max_tokens = resolve_max_tokens(req, len(prompt), limits)
        sampling = common_pb2.SamplingParams()
        sampling.CopyFrom(req.sampling)
        sampling.max_tokens = max_tokens
        engine_req = engine_pb2.GenerateRequest(request_id=request_id, prompt_token_ids=prompt,
                                                sampling=sampling, include_load=True)
        if req.HasField("priority"):
            engine_req.priority = req.priority
        engine_req.cache_salt = req.cache_salt
        if req.HasField("prefix_cache"):
            engine_req.prefix_cache = req.prefix_cache

        detok = self._tokenizer.detokenizer(deadline.remaining())
        engine = call = None
        # The detokenizer's start travels while the engine prefills.
        start = asyncio.ensure_future(_start_detokenizer(detok, prompt, req))
        try:
            engine, call, first = await self._dispatch(engine_req, len(prompt), max_tokens, deadline)
            if (exc := await start) is not None:
                raise downstream_error("tokenizer", exc)
            stream = CommittedStream(req, request_id, len(prompt), engine, call, detok)
            async with contextlib.aclosing(stream.run(first)) as responses:
                async for out in responses:
                    yield out
        finally:
            if not start.done():
                start.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await start
            await detok.close()
            if call is not None:
                call.cancel()
            if engine is not None:
                self._pool.end(engine, request_id)

    async def _dispatch(self, engine_req, num_prompt_tokens, max_tokens, deadline):
        """Choose an engine and get its first response, failing over before that. Returns
        (engine, call, first response); the caller owns the request's pending blocks from then on."""
        excluded: list[str] = []
        last_error = ""
        use_cache = not engine_req.HasField("prefix_cache") or engine_req.prefix_cache
        prompt = PromptKey(engine_req.prompt_token_ids, engine_req.cache_salt) if use_cache else None
        for attempt in range(self._config.max_attempts):
            candidates = self._pool.candidates(set(excluded))
            decision = self._policy.choose(engine_req.request_id, candidates, num_prompt_tokens, max_tokens,
                                           self._rng, prompt)
            decision.attempt, decision.excluded = attempt, list(excluded)
            self.on_decision(decision)
            if decision.chosen is None:
                too_big = [s for s in decision.scored if s.need_blocks > s.candidate.total_blocks]
                if candidates and len(too_big) == len(decision.scored):
                    raise too_large_error(self._pool.engines.values(), num_prompt_tokens, max_tokens, too_big)
                if candidates:
                    needs = sorted({s.need_blocks for s in decision.scored})
                    raise ResourceExhausted(
                        f"no engine can admit the request now ({len(candidates)} ready, request needs "
                        f"{needs[0]} KV blocks)", retry_after_s=self._config.retry_after_s)
                raise Unavailable("no ready engine" + (f" (last failure: {last_error})" if last_error else ""))
            engine = self._pool.begin(decision.chosen, engine_req.request_id, decision.reserve_blocks)
            call = engine.generate(engine_req, timeout=deadline.remaining())
            try:
                first = await call.read()
            except grpc.aio.AioRpcError as exc:
                self._pool.end(engine, engine_req.request_id)
                if exc.code() not in _FAILOVER_CODES:
                    raise downstream_error("engine", exc) from None
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    engine.eject(f"Generate failed: {exc.code().name}: {exc.details()}", recheck=True)
                last_error = f"{engine.address}: {exc.code().name}: {exc.details()}"
                log.warning("request %s: engine %s failed before its first token, failing over: %s",
                            engine_req.request_id, engine.address, last_error)
                excluded.append(engine.address)
                continue
            except BaseException:
                call.cancel()
                self._pool.end(engine, engine_req.request_id)
                raise
            if first is grpc.aio.EOF or _engine_failed(first):
                self._pool.end(engine, engine_req.request_id)
                if first is grpc.aio.EOF:
                    last_error = f"{engine.address}: stream ended before any response"
                else:  # it failed for good before this request's first token (engine_svc/watchdog.py)
                    call.cancel()
                    engine.eject(f"engine failed: {first.error.message}", recheck=True)
                    last_error = f"{engine.address}: {first.error.message}"
                excluded.append(engine.address)
                continue
            return engine, call, first
        raise Unavailable(f"no engine answered after {self._config.max_attempts} attempts: {last_error}")
