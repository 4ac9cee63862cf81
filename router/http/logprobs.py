"""Logprobs in OpenAI's two shapes, from the router's token records.

OpenAI names tokens by their text; the router returns ids. Each id's text is its one-token decode
(as vLLM reports it), asked of the tokenizer once per id and kept: a vocabulary is finite and
logprobs requests are rare next to plain ones.
"""

from __future__ import annotations

import asyncio

from kvmesh.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc

MAX_CACHED_IDS = 1 << 18


class TokenTexts:
    """id -> text of that token alone (special tokens kept), cached."""

    def __init__(self, stub: tokenizer_pb2_grpc.TokenizerStub):
        self._stub = stub
        self._texts: dict[int, str] = {}

    async def _decode(self, token_id: int) -> None:
        reply = await self._stub.Detokenize(tokenizer_pb2.DetokenizeRequest(token_ids=[token_id],
                                                                             skip_special_tokens=False), timeout=10.0)
        if len(self._texts) < MAX_CACHED_IDS:
            self._texts[token_id] = reply.text

    async def texts(self, tokens: list[common_pb2.Token]) -> dict[int, str]:
        """The texts of every id in `tokens` and their top candidates."""
        ids = {t.id for t in tokens} | {c.token_id for t in tokens for c in t.top_logprobs}
        missing = [i for i in ids if i not in self._texts]
        await asyncio.gather(*(self._decode(i) for i in missing))
        return {i: self._texts[i] for i in ids if i in self._texts}


def completion_logprobs(tokens: list[common_pb2.Token], texts: dict[int, str], text_offset: int) -> dict:
    """/v1/completions' shape: parallel lists; text_offset counts characters from the completion's start."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in tokens:
        text = texts.get(t.id, "")
        out["tokens"].append(text)
        out["token_logprobs"].append(t.logprob if t.HasField("logprob") else None)
        out["top_logprobs"].append({texts.get(c.token_id, ""): c.logprob for c in t.top_logprobs})
        out["text_offset"].append(text_offset)
        text_offset += len(text)
    return out


def _entry(token_id: int, logprob: float, texts: dict[int, str]) -> dict:
    text = texts.get(token_id, "")
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def chat_logprobs(tokens: list[common_pb2.Token], texts: dict[int, str]) -> dict:
    """/v1/chat/completions' shape: one record per token with its top candidates."""
    content = []
    for t in tokens:
        entry = _entry(t.id, t.logprob, texts)
        entry["top_logprobs"] = [_entry(c.token_id, c.logprob, texts) for c in t.top_logprobs]
        content.append(entry)
    return {"content": content}
