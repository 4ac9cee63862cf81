"""POST /v1/chat/completions: messages as a RouterGenerateRequest (rendered by the tokenizer tier's
chat template), and the answer in OpenAI's `chat.completion` / `chat.completion.chunk` shapes."""

from __future__ import annotations

import time

from kvmesh.v1 import common_pb2, router_pb2
from router.http.fields import apply_sampling, finish_reason, request_logprobs, usage
from router.http.generation import Renderer
from router.http.logprobs import TokenTexts, chat_logprobs
from router.http.schemas import ChatCompletionRequest, ChatMessageIn

# OpenAI's newer "developer" role is what chat templates know as "system".
_ROLES = {"developer": "system"}


def _message(m: ChatMessageIn) -> common_pb2.ChatMessage:
    if isinstance(m.content, list):
        content = "\n".join(part.text or "" for part in m.content)  # text parts joined, as vLLM does
    else:
        content = m.content or ""
    msg = common_pb2.ChatMessage(role=_ROLES.get(m.role, m.role), content=content)
    if m.name is not None:
        msg.name = m.name
    if m.tool_call_id is not None:
        msg.tool_call_id = m.tool_call_id
    return msg


def chat_request(body: ChatCompletionRequest, request_id: str) -> router_pb2.RouterGenerateRequest:
    """Raises OpenAIError (400) naming the field."""
    req = router_pb2.RouterGenerateRequest(request_id=request_id)
    req.chat.messages.extend(_message(m) for m in body.messages)
    req.chat.add_generation_prompt = body.add_generation_prompt
    if body.max_completion_tokens is not None:
        apply_sampling(body, req, max_tokens=body.max_completion_tokens, max_tokens_param="max_completion_tokens")
    else:
        apply_sampling(body, req, max_tokens=body.max_tokens)
    if body.logprobs:
        request_logprobs(req, body.top_logprobs or 0)
    return req


class ChatRenderer(Renderer):
    def __init__(self, model: str, token_texts: TokenTexts, with_logprobs: bool):
        self._model = model
        self._texts = token_texts
        self._with_logprobs = with_logprobs
        self._created = int(time.time())
        self._sent_role = False

    def _head(self, out: router_pb2.RouterGenerateResponse, obj: str) -> dict:
        return {"id": f"chatcmpl-{out.request_id}", "object": obj, "created": self._created, "model": self._model}

    async def _logprobs(self, tokens) -> dict | None:
        if not self._with_logprobs:
            return None
        return chat_logprobs(list(tokens), await self._texts.texts(list(tokens)))

    def _chunk(self, out, delta: dict, logprobs: dict | None, reason: str | None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return {**self._head(out, "chat.completion.chunk"), "choices": [choice]}

    async def chunks(self, out):
        chunks = []
        if not self._sent_role:  # OpenAI's first chunk names the role, with empty content
            self._sent_role = True
            chunks.append(self._chunk(out, {"role": "assistant", "content": ""}, None, None))
        reason = finish_reason(out)
        if out.text or out.tokens:
            chunks.append(self._chunk(out, {"content": out.text}, await self._logprobs(out.tokens), None))
        if reason is not None:
            chunks.append(self._chunk(out, {}, None, reason))
        return chunks

    async def body(self, outs):
        last = outs[-1]
        message = {"role": "assistant", "content": "".join(o.text for o in outs)}
        choice = {"index": 0, "message": message,
                  "logprobs": await self._logprobs([t for o in outs for t in o.tokens]),
                  "finish_reason": finish_reason(last)}
        return {**self._head(last, "chat.completion"), "choices": [choice], "usage": usage(last)}

    def usage_chunk(self, last):
        return {**self._head(last, "chat.completion.chunk"), "choices": [], "usage": usage(last)}
