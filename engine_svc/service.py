"""kvmesh.v1.Engine over gRPC: validation at the boundary, the engine loop behind it.

Every check that can fail runs before admission, so a bad request never reaches the model:
empty prompt, ids outside the vocabulary, sampling values, prompt + max_tokens beyond max_model_len,
a sequence larger than the whole KV cache, a live duplicate id, draining / not ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
import uuid

from kvmesh import __version__
from kvmesh.blocks import blocks_for
from kvmesh.load import to_report
from kvmesh.prefix_hash import prompt_block_hashes
from kvmesh.serving.errors import AlreadyExists, FailedPrecondition, InvalidArgument, Unavailable
from kvmesh.v1 import SCHEMA_REVISION, common_pb2, engine_pb2, engine_pb2_grpc

from engine_svc.core.hooks import EngineHooks
from engine_svc.core.request import ErrorKind, FinishReason, Request, RequestOutput
from engine_svc.engine_loop import AbortResult, DuplicateRequest, EngineLoop, OutputSink
from engine_svc.generate_stream import GenerateSession
from engine_svc.kv_events import KvEventPublisher
from engine_svc.sampling_params import SamplingParams, SamplingParamsError

SERVICE_NAME = "kvmesh.v1.Engine"
DEFAULT_MAX_TOKENS = 256
CAPABILITIES = ["logprobs", "top_logprobs", "seed", "stop_token_ids", "min_tokens", "ignore_eos",
                "priority", "chunked_prefill", "abort", "watch_load", "cache_salt", "generate_stream"]
PREFIX_CAPABILITIES = ["prefix_caching", "kv_events"]  # added when prefix caching is on
MAX_CACHE_SALT_BYTES = 256

_FINISH = {
    FinishReason.STOP_TOKEN: common_pb2.FINISH_REASON_STOP_TOKEN,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: common_pb2.FINISH_REASON_ERROR,
}
# ErrorKind -> (google.rpc code, kvmesh.v1.ErrorReason)
_ERRORS = {
    ErrorKind.INTERNAL: (13, common_pb2.ERROR_REASON_INTERNAL),
    ErrorKind.OUT_OF_KV_CACHE: (8, common_pb2.ERROR_REASON_OUT_OF_KV_CACHE),
    ErrorKind.DRAINING: (14, common_pb2.ERROR_REASON_DRAINING),
    ErrorKind.ENGINE_FAILED: (14, common_pb2.ERROR_REASON_ENGINE_LOST),
}
_ABORT = {
    AbortResult.ABORTED: engine_pb2.ABORT_RESULT_ABORTED,
    AbortResult.ALREADY_FINISHED: engine_pb2.ABORT_RESULT_ALREADY_FINISHED,
    AbortResult.NOT_FOUND: engine_pb2.ABORT_RESULT_NOT_FOUND,
}
_SAMPLING_SCALARS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty", "seed", "max_tokens", "min_tokens", "ignore_eos", "logprobs",
                     "top_logprobs")


class EngineService(engine_pb2_grpc.EngineServicer):
    """The servicer. ``ready`` flips after the warm-up generation; ``draining`` at shutdown."""

    def __init__(self, engine: EngineLoop, engine_id: str | None = None, hooks: EngineHooks | None = None):
        self.engine = engine
        self._hooks = hooks or EngineHooks()  # the engine core's hooks: begin() gives each request its trace
        self.engine_id = engine_id or f"engine-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.ready = False
        self.draining = False
        self._report_seq = itertools.count(1)
        self.kv_events: KvEventPublisher | None = None
        self._kv_task: asyncio.Task | None = None
        self._sessions: set[GenerateSession] = set()  # open GenerateStreams (woken when draining starts)

    def start_kv_events(self) -> None:
        """Start publishing KV events (after the engine started; a no-op without prefix caching)."""
        if self.engine.kv_events is None or self.kv_events is not None:
            return
        self.kv_events = KvEventPublisher(self.engine.kv_events, self.engine_id, self.engine.config.block_size)
        self._kv_task = asyncio.create_task(self.kv_events.run(self.engine.wait_load_change),
                                            name="kv-event-publisher")

    async def close(self) -> None:
        if self._kv_task is not None:
            self._kv_task.cancel()
            await asyncio.gather(self._kv_task, return_exceptions=True)
            self._kv_task = None

    # ---- Generate ----

    async def Generate(self, request: engine_pb2.GenerateRequest, context):
        req = self.admissible(request)
        req.trace = self._hooks.begin(req.request_id, len(req.prompt_token_ids), request.sampling)
        async for response in self.stream(req, request.include_load):
            yield response

    async def GenerateStream(self, request_iterator, context):
        """Many requests on one stream (engine_svc/generate_stream.py)."""
        session = GenerateSession(self, self._hooks)
        self._sessions.add(session)
        try:
            async with contextlib.aclosing(session.run(request_iterator)) as messages:
                async for message in messages:
                    yield message
        finally:
            self._sessions.discard(session)

    def start_draining(self) -> None:
        """Refuse new requests from now on; GenerateStreams end once their requests are done."""
        self.draining = True
        for session in self._sessions:
            session.wake()

    def admissible(self, request: engine_pb2.GenerateRequest) -> Request:
        """The Request to admit, or the ServiceError Generate fails with (draining, not ready, bad input)."""
        if self.draining:
            raise Unavailable("the engine is draining (shutting down): send the request to another replica")
        if not self.ready:
            raise Unavailable("the engine is not ready yet (see GetStatus): retry shortly")
        return self.validate(request)

    def enqueue(self, req: Request, sink: OutputSink | None = None) -> OutputSink:
        """Hand a validated request to the engine loop; its outputs arrive on the returned sink
        (`sink`, or a queue of its own). Raises AlreadyExists for an id that is live already."""
        try:
            return self.engine.add(req, sink)
        except DuplicateRequest:
            if req.trace is not None:
                req.trace.rejected()
            raise AlreadyExists(f"request_id {req.request_id!r} is already live on this engine") from None

    async def stream(self, req: Request, include_load: bool = False):
        """Admit a validated request and yield its responses; abort it if the consumer goes away."""
        outputs = self.enqueue(req)
        finished = False
        first = True
        trace = req.trace
        try:
            while not finished:
                batch = [await outputs.get()]
                # Every output already queued goes in the same response: when the engine steps
                # faster than this stream is written (a fast GPU, a busy event loop), one message
                # carries the tokens of several steps instead of one message per token, which is
                # most of the event loop's cost per token (gRPC's send path).
                while not outputs.empty():
                    batch.append(outputs.get_nowait())
                finished = batch[-1].finished  # the finished output is always the last one queued
                response = engine_pb2.GenerateResponse()
                self.fill_response(response, batch)
                # The router reads a report on the first response (its pending blocks are now
                # counted by the engine) and on the last (they are freed); the WatchLoad stream
                # covers the time in between, so the responses between carry none.
                if include_load and (first or finished):
                    response.load.CopyFrom(self.load_report())
                if trace is not None:
                    trace.output(len(response.tokens))
                yield response
                first = False
        finally:  # client cancel, deadline, or a closed generator: free the blocks at the next step
            if not finished:
                if req.trace is not None:
                    req.trace.client_cancelled()
                self.engine.abort(req.request_id)

    def validate(self, request: engine_pb2.GenerateRequest) -> Request:
        """Build a Request from the wire, or raise InvalidArgument naming the field and the limit."""
        info, max_len = self.engine.info, self.engine.max_model_len
        prompt = list(request.prompt_token_ids)
        if not prompt:
            raise InvalidArgument("prompt_token_ids", "must not be empty")
        top = max(prompt)
        if top >= info.vocab_size:
            raise InvalidArgument("prompt_token_ids", (
                f"id {top} at index {prompt.index(top)} is outside the vocabulary [0, {info.vocab_size})"))
        params = self._sampling(request.sampling, len(prompt), max_len, info.vocab_size)
        if len(prompt) + params.max_tokens > max_len:
            raise InvalidArgument("sampling.max_tokens", (
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) = "
                f"{len(prompt) + params.max_tokens} exceeds max_model_len {max_len}: "
                f"shorten the prompt or lower max_tokens"))
        block_size = self.engine.config.block_size
        need = blocks_for(len(prompt) + params.max_tokens, block_size)
        if need > self.engine.num_blocks:
            raise InvalidArgument("sampling.max_tokens", (
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) needs {need} KV blocks "
                f"of {block_size} tokens; this engine's cache holds {self.engine.num_blocks}: lower max_tokens"))
        if len(request.cache_salt.encode("utf-8")) > MAX_CACHE_SALT_BYTES:
            raise InvalidArgument("cache_salt", f"is {len(request.cache_salt.encode('utf-8'))} bytes; "
                                                f"at most {MAX_CACHE_SALT_BYTES}")
        request_id = request.request_id or uuid.uuid4().hex
        priority = request.priority if request.HasField("priority") else 0
        use_cache = request.prefix_cache if request.HasField("prefix_cache") else True
        req = Request(request_id, prompt, params, priority=priority, cache_salt=request.cache_salt,
                      use_prefix_cache=use_cache)
        if use_cache and self.engine.config.enable_prefix_caching:
            # Hashed here, on the event loop, so the engine thread does not (it extends them as the
            # sequence grows). Full blocks of the prompt but its last token's block (never shared).
            req.block_hashes = prompt_block_hashes(prompt[:-1], block_size, request.cache_salt)
        return req

    @staticmethod
    def _sampling(wire: common_pb2.SamplingParams, prompt_len: int, max_len: int,
                  vocab_size: int) -> SamplingParams:
        values = {name: getattr(wire, name) for name in _SAMPLING_SCALARS if wire.HasField(name)}
        if prompt_len >= max_len:
            raise InvalidArgument("prompt_token_ids", (
                f"prompt ({prompt_len} tokens) leaves no room below max_model_len {max_len}: shorten it"))
        values.setdefault("max_tokens", min(DEFAULT_MAX_TOKENS, max_len - prompt_len))
        params = SamplingParams(stop_token_ids=list(wire.stop_token_ids), **values)
        try:
            return params.validate(vocab_size)
        except SamplingParamsError as err:
            raise InvalidArgument(f"sampling.{err.field}", str(err).split(": ", 1)[-1]) from None

    @staticmethod
    def fill_response(resp: engine_pb2.GenerateResponse, outs: list[RequestOutput]) -> None:
        """Fill an empty response from a request's queued outputs, in order (only the last may be finished)."""
        out = outs[-1]
        resp.request_id = out.request_id
        add = resp.tokens.add
        for part in outs:
            index = part.first_index
            for tok in part.tokens:
                if tok.logprob is None:
                    add(id=tok.token_id, index=index)
                else:
                    record = add(id=tok.token_id, index=index, logprob=tok.logprob)
                    for tid, lp in tok.top_logprobs or ():
                        record.top_logprobs.add(token_id=tid, logprob=lp)
                index += 1
        if out.finished:
            resp.finish_reason = _FINISH[out.finish_reason]
            if out.stop_token_id is not None:
                resp.matched_stop_token_id = out.stop_token_id
            resp.usage.prompt_tokens = out.num_prompt_tokens
            resp.usage.completion_tokens = out.num_output_tokens
            resp.usage.cached_prompt_tokens = resp.num_cached_prompt_tokens = out.num_cached_tokens
            if out.finish_reason is FinishReason.ERROR:
                code, reason = _ERRORS[out.error_kind or ErrorKind.INTERNAL]
                resp.error.CopyFrom(common_pb2.StreamError(code=code, message=out.error or "", reason=reason))

    # ---- Abort / load / info / status ----

    async def Abort(self, request: engine_pb2.AbortRequest, context) -> engine_pb2.AbortResponse:
        if not request.request_id:
            raise InvalidArgument("request_id", "must not be empty")
        return engine_pb2.AbortResponse(result=_ABORT[self.engine.abort(request.request_id)])

    def load_report(self) -> common_pb2.LoadReport:
        """A new report (its own sequence number and clock) from the latest load snapshot."""
        return to_report(self.engine.load, engine_id=self.engine_id, sequence=next(self._report_seq),
                         engine_time=time.monotonic(), draining=self.draining)

    async def GetLoad(self, request, context) -> common_pb2.LoadReport:
        return self.load_report()

    async def WatchLoad(self, request: engine_pb2.WatchLoadRequest, context):
        """One report at once, then one per change (at most every min_interval), heartbeat otherwise;
        the stream ends (OK) right after the first report with draining=True."""
        min_interval = (request.min_interval_ms if request.HasField("min_interval_ms") else 20) / 1000
        heartbeat = max((request.heartbeat_ms if request.HasField("heartbeat_ms") else 1000) / 1000, 0.001)
        loop = asyncio.get_running_loop()
        sent_counts, sent_draining = self._counts(), self.draining
        last_sent = loop.time()
        yield self.load_report()
        # A watcher holds no engine state, so a cancelled stream needs no cleanup. Draining ends the
        # stream after the report that says so: a watcher is not work for the drain to wait for.
        while not sent_draining:
            await self.engine.wait_load_change(max(last_sent + heartbeat - loop.time(), 0))
            changed = self._counts() != sent_counts or self.draining != sent_draining
            if not changed and loop.time() < last_sent + heartbeat:
                continue
            wait = last_sent + min_interval - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)  # rate limit: coalesce the changes of several steps
            sent_counts, sent_draining = self._counts(), self.draining
            last_sent = loop.time()
            yield self.load_report()

    def _counts(self) -> tuple | None:
        return self.engine.load.counts() if self.engine.load is not None else None

    async def SubscribeKvEvents(self, request: engine_pb2.SubscribeKvEventsRequest, context):
        """A snapshot of the block hashes held, then one batch per step that changed them."""
        if self.kv_events is None:
            raise FailedPrecondition("prefix caching is off on this engine (--enable-prefix-caching): no KV events")
        heartbeat = max((request.heartbeat_ms if request.HasField("heartbeat_ms") else 1000) / 1000, 0.001)
        async with contextlib.aclosing(self.kv_events.subscribe(heartbeat)) as batches:
            async for batch in batches:
                yield batch
                if self.draining:  # a subscriber is not work for the drain to wait for: end within a heartbeat
                    return

    async def GetInfo(self, request, context) -> common_pb2.ServiceInfo:
        caps = CAPABILITIES + (PREFIX_CAPABILITIES if self.engine.config.enable_prefix_caching else [])
        info = common_pb2.ServiceInfo(name="kvmesh-engine", version=__version__,
                                      schema_revision=SCHEMA_REVISION, pid=os.getpid(),
                                      capabilities=caps, model=self._model_name())
        mi = self.engine.info
        if mi is not None:
            info.max_model_len, info.vocab_size = self.engine.max_model_len, mi.vocab_size
            info.eos_token_ids.extend(mi.eos_token_ids)
            if mi.bos_token_id is not None:
                info.bos_token_id = mi.bos_token_id
            info.kv_block_size, info.kv_total_blocks = self.engine.config.block_size, self.engine.num_blocks
        return info

    def _model_name(self) -> str:
        return self.engine.info.name if self.engine.info is not None else os.path.basename(
            self.engine.config.model.rstrip("/"))

    async def GetStatus(self, request, context) -> engine_pb2.EngineStatus:
        return self.engine.status.to_proto()
