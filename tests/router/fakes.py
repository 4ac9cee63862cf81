"""Scriptable in-process tokenizer and engine servicers for router tests that need exact control
(a failure at a chosen token, a recorded deadline, a counted cancel). The end-to-end tests use the
real services; these check the router's own logic against behaviour we dictate.

Fake tokenizer: a text's ids are its UTF-8 bytes + 3, one character per id, no BOS.
Fake engine: emits ids from `script` (default: the prompt ids cycled), one per step.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

import grpc

from kvmesh.serving.errors import Unavailable
from kvmesh.serving.server import start_server
from kvmesh.v1 import common_pb2, engine_pb2, engine_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc

VOCAB = 259


def encode(text: str) -> list[int]:
    return [b + 3 for b in text.encode()]


def decode(ids) -> str:
    return bytes(i - 3 for i in ids if i >= 3).decode(errors="replace")


class FakeTokenizer(tokenizer_pb2_grpc.TokenizerServicer):
    async def Tokenize(self, request, context):
        return tokenizer_pb2.TokenizeResponse(token_ids=encode(request.text))

    async def ApplyChatTemplate(self, request, context):
        prompt = "".join(f"<{m.role}>{m.content}" for m in request.messages) + "<assistant>"
        return tokenizer_pb2.ApplyChatTemplateResponse(prompt=prompt, token_ids=encode(prompt))

    async def GetInfo(self, request, context):
        return tokenizer_pb2.TokenizerInfo(service=common_pb2.ServiceInfo(name="fake-tok", model="fake"),
                                           vocab_size=VOCAB, eos_token_ids=[2], max_length=512,
                                           max_stop_strings=8, max_stop_string_bytes=64)

    async def DetokenizeStream(self, request_iterator, context):
        stops: list[str] = []
        text = ""
        sent = 0
        n = 0
        async for msg in request_iterator:
            kind = msg.WhichOneof("kind")
            if kind == "start":
                stops = list(msg.start.stop)
                continue
            if kind == "finish":
                yield tokenizer_pb2.DetokenizeStreamResponse(text=text[sent:], num_tokens=n, done=True)
                return
            for i in msg.tokens.ids:
                text += decode([i])
                for stop in stops:
                    if stop in text:
                        text = text[:text.index(stop)]
                        yield tokenizer_pb2.DetokenizeStreamResponse(
                            text=text[sent:], num_tokens=n + 1, done=True,
                            stop_match=tokenizer_pb2.StopStringMatch(stop=stop, token_index=n))
                        return
                n += 1
            safe = len(text) - max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            yield tokenizer_pb2.DetokenizeStreamResponse(text=text[sent:safe], num_tokens=n)
            sent = max(sent, safe)


@dataclass
class FakeEngine(engine_pb2_grpc.EngineServicer):
    """An engine whose behaviour the test scripts. Records what it saw."""

    engine_id: str
    total_blocks: int = 64
    step_s: float = 0.01
    fail_before_first: bool = False  # UNAVAILABLE before any response
    fail_after: int | None = None  # UNAVAILABLE after this many tokens
    requests: list = field(default_factory=list)  # (request, time_remaining)
    cancelled: list = field(default_factory=list)  # request ids whose stream the router cancelled
    aborted: list = field(default_factory=list)
    generated: dict = field(default_factory=dict)  # request id -> tokens produced
    _seq: itertools.count = field(default_factory=itertools.count)
    live: set = field(default_factory=set)

    def report(self) -> common_pb2.LoadReport:
        used = 4 * len(self.live)
        return common_pb2.LoadReport(engine_id=self.engine_id, sequence=next(self._seq),
                                     engine_time=time.monotonic(), block_size=16,
                                     total_blocks=self.total_blocks, free_blocks=self.total_blocks - used,
                                     in_use_blocks=used, num_running_requests=len(self.live))

    async def GetInfo(self, request, context):
        return common_pb2.ServiceInfo(name="kvmesh-engine", model="fake", max_model_len=512,
                                      kv_block_size=16, kv_total_blocks=self.total_blocks)

    async def WatchLoad(self, request, context):
        while True:
            yield self.report()
            await asyncio.sleep(0.05)

    async def GetLoad(self, request, context):
        return self.report()

    async def Abort(self, request, context):
        self.aborted.append(request.request_id)
        return engine_pb2.AbortResponse(result=engine_pb2.ABORT_RESULT_ABORTED)

    async def Generate(self, request, context):
        rid = request.request_id
        self.requests.append((request, context.time_remaining()))
        if self.fail_before_first:
            raise Unavailable("fake engine is down")
        self.live.add(rid)
        self.generated[rid] = 0
        ids = list(request.prompt_token_ids)
        try:
            for i in range(request.sampling.max_tokens):
                await asyncio.sleep(self.step_s)
                if self.fail_after is not None and i == self.fail_after:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "fake engine crashed")
                if rid in self.aborted:
                    yield engine_pb2.GenerateResponse(
                        request_id=rid, finish_reason=common_pb2.FINISH_REASON_CANCELLED,
                        usage=common_pb2.Usage(prompt_tokens=len(ids), completion_tokens=i))
                    return
                self.generated[rid] = i + 1
                token = common_pb2.Token(id=ids[i % len(ids)], index=i)
                last = i + 1 == request.sampling.max_tokens
                yield engine_pb2.GenerateResponse(
                    request_id=rid, tokens=[token], load=self.report(),
                    finish_reason=common_pb2.FINISH_REASON_LENGTH if last else 0,
                    usage=common_pb2.Usage(prompt_tokens=len(ids), completion_tokens=i + 1) if last else None)
        except asyncio.CancelledError:
            self.cancelled.append(rid)
            raise
        finally:
            self.live.discard(rid)


async def serve_engine(engine: FakeEngine):
    running = await start_server(register=lambda s: engine_pb2_grpc.add_EngineServicer_to_server(engine, s),
                                 service_names=["kvmesh.v1.Engine"], port=0)
    return running, f"127.0.0.1:{running.port}"


async def serve_tokenizer():
    running = await start_server(
        register=lambda s: tokenizer_pb2_grpc.add_TokenizerServicer_to_server(FakeTokenizer(), s),
        service_names=["kvmesh.v1.Tokenizer"], port=0)
    return running, f"127.0.0.1:{running.port}"
