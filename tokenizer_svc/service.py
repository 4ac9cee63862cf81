"""kvmesh.v1.Tokenizer servicer: request validation, then the tokenizer work off the event loop.

Encoding and decoding run in a thread pool (`tokenizers` releases the GIL in its batch calls, so
several run in parallel). A short text to encode and a DetokenizeStream batch of a few ids are
processed inline instead: they cost less than the hop to a thread and back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

import kvmesh
from kvmesh.serving.errors import InvalidArgument
from kvmesh.telemetry.tokenizer import record_tokens
from kvmesh.v1 import SCHEMA_REVISION, common_pb2, tokenizer_pb2, tokenizer_pb2_grpc
from tokenizer_svc.chat import parse_chat_request, render_chat
from tokenizer_svc.limits import TokenizerLimits, check_ids, check_stops, check_text
from tokenizer_svc.loader import LoadedTokenizer
from tokenizer_svc.sessions import SessionTable
from tokenizer_svc.stream import StreamDetokenizer, StreamStep
from tokenizer_svc.tokenize_stream import TokenizeSession

SERVICE_NAME = "kvmesh.v1.Tokenizer"
# Stream batches up to this many ids are detokenized on the event loop (see the module docstring).
INLINE_STREAM_IDS = 64
# A DetokenizeSessions message up to this many ids (all sessions together) is applied on the event
# loop: per id it costs a table lookup of a microsecond or two, which holds the GIL in a worker
# thread as well, so the hop would only add latency to every session in the message.
INLINE_SESSION_IDS = 1024
# Texts up to this many characters are encoded on the event loop: tens of microseconds, less than
# the hop to a worker thread and back on a busy host (a text this short blocks nothing for long).
INLINE_TEXT_CHARS = 2048


def tokenizer_info(tok: LoadedTokenizer, limits: TokenizerLimits) -> tokenizer_pb2.TokenizerInfo:
    """GetInfo's answer; fixed for the life of the process."""
    capabilities = ["tokenize", "tokenize_stream", "detokenize", "detokenize_stream", "detokenize_sessions",
                    "stop_strings", "parse_special_tokens"]
    if tok.has_chat_template:
        capabilities.append("chat_template")
    service = common_pb2.ServiceInfo(
        name="kvmesh-tokenizer", version=kvmesh.__version__, schema_revision=SCHEMA_REVISION, model=tok.name,
        vocab_size=tok.vocab_size, eos_token_ids=tok.eos_token_ids, capabilities=capabilities, pid=os.getpid())
    if tok.max_length:
        service.max_model_len = tok.max_length
    if tok.bos_token_id is not None:
        service.bos_token_id = tok.bos_token_id
    info = tokenizer_pb2.TokenizerInfo(
        service=service, vocab_size=tok.vocab_size, eos_token_ids=tok.eos_token_ids, max_length=tok.max_length,
        has_chat_template=tok.has_chat_template, max_text_bytes=limits.max_text_bytes,
        max_stop_strings=limits.max_stop_strings, max_stop_string_bytes=limits.max_stop_string_bytes,
        max_ids_per_request=limits.max_ids_per_request, max_sessions_per_stream=limits.max_sessions_per_stream)
    if tok.bos_token_id is not None:
        info.bos_token_id = tok.bos_token_id
    if tok.pad_token_id is not None:
        info.pad_token_id = tok.pad_token_id
    return info


def _flag(message, field: str, default: bool) -> bool:
    return getattr(message, field) if message.HasField(field) else default


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServicer):
    """Serves one loaded tokenizer. Stateless between RPCs; each stream owns its session."""

    def __init__(self, tok: LoadedTokenizer, limits: TokenizerLimits, executor: ThreadPoolExecutor):
        self._tok = tok
        self._limits = limits
        self._executor = executor
        self._info = tokenizer_info(tok, limits)

    async def _offload(self, fn: Callable, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def Tokenize(self, request, context):
        ids = self._tokenize_inline(request)
        if ids is None:
            ids = await self._tokenize_offloaded(request)
        return tokenizer_pb2.TokenizeResponse(token_ids=ids)

    async def TokenizeStream(self, request_iterator, context) -> AsyncIterator:
        session = TokenizeSession(self._tokenize_inline, self._tokenize_offloaded)
        async with contextlib.aclosing(session.run(request_iterator)) as messages:
            async for message in messages:
                yield message

    def _tokenize_inline(self, request) -> list[int] | None:
        """The ids of a short text (a prompt's worth: cheaper than the hop to a thread), or None for a
        long one. Raises InvalidArgument."""
        if request.text:  # empty text is valid: it encodes to the special tokens alone (BOS), as in vLLM
            check_text("text", request.text, self._limits)
        if len(request.text) > INLINE_TEXT_CHARS:
            return None
        encoding = self._encoder(request).encode(request.text, add_special_tokens=_flag(request, "add_special_tokens", True))
        record_tokens("tokenize", len(encoding.ids))
        return encoding.ids

    async def _tokenize_offloaded(self, request) -> list[int]:
        """The ids of a long (already checked) text, encoded in the thread pool."""
        (encoding,) = await self._offload(self._encoder(request).encode_batch, [request.text],
                                          add_special_tokens=_flag(request, "add_special_tokens", True))
        record_tokens("tokenize", len(encoding.ids))
        return encoding.ids

    def _encoder(self, request):
        return self._tok.special_tokenizer if _flag(request, "parse_special_tokens", False) else self._tok.text_tokenizer

    async def Detokenize(self, request, context):
        check_ids("token_ids", request.token_ids, self._tok.vocab_size, self._limits, allow_empty=False)
        (text,) = await self._offload(self._tok.text_tokenizer.decode_batch, [list(request.token_ids)],
                                      skip_special_tokens=_flag(request, "skip_special_tokens", True))
        record_tokens("detokenize", len(request.token_ids))
        return tokenizer_pb2.DetokenizeResponse(text=text)

    async def ApplyChatTemplate(self, request, context):
        chat = parse_chat_request(request)
        prompt, ids = await self._offload(render_chat, self._tok.hf, chat)
        check_text("messages (rendered prompt)", prompt, self._limits)
        record_tokens("chat_template", len(ids))
        return tokenizer_pb2.ApplyChatTemplateResponse(prompt=prompt, token_ids=ids)

    async def GetInfo(self, request, context):
        return self._info

    async def DetokenizeStream(self, request_iterator, context) -> AsyncIterator:
        session: StreamDetokenizer | None = None
        async for request in request_iterator:
            kind = request.WhichOneof("kind")
            if session is None:
                if kind != "start":
                    raise InvalidArgument("start", f"the first message must be start, got {kind or 'nothing'}")
                session = self._start_session(request.start)
                continue
            if kind == "tokens":
                step = await self._feed(session, request.tokens.ids)
            elif kind == "finish":
                if not request.finish:
                    raise InvalidArgument("finish", "must be true when set")
                step = session.finish()
            elif kind == "start":
                raise InvalidArgument("start", "sent twice: one start per stream")
            else:
                raise InvalidArgument("kind", "set one of start, tokens or finish")
            yield _stream_response(step)
            if step.done:
                record_tokens("detokenize_stream", step.num_tokens)
                return  # the stream ends; nothing after a stop match or finish is ever answered

    async def DetokenizeSessions(self, request_iterator, context) -> AsyncIterator:
        table = SessionTable(self._start_session, self._check_batch, self._limits.max_sessions_per_stream)
        try:
            async for request in request_iterator:
                # One stream's messages are applied in order, so the table is never touched by two
                # threads at once; a large message goes to a worker thread (as a large batch does).
                if table.num_ids(request) <= INLINE_SESSION_IDS:
                    yield table.apply(request)
                else:
                    yield await self._offload(table.apply, request)
        finally:
            table.close_all()

    def _check_batch(self, field: str, ids) -> None:
        check_ids(field, ids, self._tok.vocab_size, self._limits, allow_empty=True)

    def _start_session(self, start) -> StreamDetokenizer:
        check_ids("start.prompt_token_ids", start.prompt_token_ids, self._tok.vocab_size, self._limits,
                  allow_empty=True)
        check_stops("start.stop", start.stop, self._limits)
        return StreamDetokenizer(self._tok.text_tokenizer, list(start.prompt_token_ids), stops=list(start.stop),
                                 include_stop=_flag(start, "include_stop_string", False),
                                 skip_special_tokens=_flag(start, "skip_special_tokens", True),
                                 special_ids=self._tok.special_ids, token_bytes=self._tok.token_bytes)

    async def _feed(self, session: StreamDetokenizer, ids) -> StreamStep:
        self._check_batch("tokens.ids", ids)
        if len(ids) <= INLINE_STREAM_IDS:
            return session.feed(ids)
        return await self._offload(session.feed, list(ids))


def _stream_response(step: StreamStep) -> tokenizer_pb2.DetokenizeStreamResponse:
    response = tokenizer_pb2.DetokenizeStreamResponse(text=step.text, num_tokens=step.num_tokens, done=step.done)
    if step.stop is not None:
        response.stop_match.stop = step.stop
        response.stop_match.token_index = step.stop_token_index
    return response
