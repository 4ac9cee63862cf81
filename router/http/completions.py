"""POST /v1/completions: a text (or token-id) prompt as a RouterGenerateRequest, and its answer in
OpenAI's `text_completion` shape."""

from __future__ import annotations

import time

from kvmesh.v1 import router_pb2
from router.http.errors import bad_request
from router.http.fields import apply_sampling, finish_reason, request_logprobs, usage
from router.http.generation import Renderer
from router.http.logprobs import TokenTexts, completion_logprobs
from router.http.schemas import CompletionRequest


def completion_request(body: CompletionRequest, request_id: str) -> router_pb2.RouterGenerateRequest:
    """Raises OpenAIError (400) naming the field."""
    req = router_pb2.RouterGenerateRequest(request_id=request_id)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise bad_request("prompt", f"a batch of {len(prompt)} prompts; send one prompt per request")
        prompt = prompt[0]
    if isinstance(prompt, str):
        req.text = prompt
    else:
        if any(i < 0 for i in prompt):
            raise bad_request("prompt", "token ids are >= 0")
        req.token_ids.ids.extend(prompt)
        if not prompt:
            req.token_ids.SetInParent()  # present but empty: the router names the empty prompt
    apply_sampling(body, req, max_tokens=body.max_tokens)
    if body.logprobs is not None:
        request_logprobs(req, body.logprobs)
    return req


class CompletionRenderer(Renderer):
    def __init__(self, model: str, token_texts: TokenTexts, with_logprobs: bool):
        self._model = model
        self._texts = token_texts
        self._with_logprobs = with_logprobs
        self._created = int(time.time())
        self._num_chars = 0  # completion text so far (logprobs' text_offset)

    def _head(self, out: router_pb2.RouterGenerateResponse, obj: str = "text_completion") -> dict:
        return {"id": f"cmpl-{out.request_id}", "object": obj, "created": self._created, "model": self._model}

    async def _logprobs(self, tokens) -> dict | None:
        if not self._with_logprobs:
            return None
        lp = completion_logprobs(list(tokens), await self._texts.texts(list(tokens)), self._num_chars)
        return lp

    async def chunks(self, out):
        reason = finish_reason(out)
        if not out.text and not out.tokens and reason is None:
            return []
        logprobs = await self._logprobs(out.tokens)
        self._num_chars += len(out.text)
        choice = {"index": 0, "text": out.text, "logprobs": logprobs, "finish_reason": reason}
        return [{**self._head(out), "choices": [choice]}]

    async def body(self, outs):
        last = outs[-1]
        logprobs = await self._logprobs([t for o in outs for t in o.tokens])
        choice = {"index": 0, "text": "".join(o.text for o in outs), "logprobs": logprobs,
                  "finish_reason": finish_reason(last)}
        return {**self._head(last), "choices": [choice], "usage": usage(last)}

    def usage_chunk(self, last):
        return {**self._head(last), "choices": [], "usage": usage(last)}
