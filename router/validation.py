"""Request validation at the router: every message names the field, the value and the limit.

Two passes: `check_request` before any downstream call (shape, model, stop strings, obvious sampling
ranges), and `resolve_max_tokens` once the prompt length is known (prompt and total length limits,
the default max_tokens). Finer sampling checks are the engine's; its INVALID_ARGUMENT reaches the
client unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmesh.serving.errors import InvalidArgument, NotFound
from kvmesh.v1 import router_pb2

MAX_REQUEST_ID_BYTES = 128


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """What the deployment accepts, from the router's config and the model behind it."""

    model: str
    max_model_len: int
    vocab_size: int
    default_max_tokens: int
    max_tokens_limit: int
    max_prompt_tokens: int
    max_stop_strings: int
    max_stop_string_bytes: int


def check_request(req: router_pb2.RouterGenerateRequest, limits: RequestLimits) -> None:
    """Raises InvalidArgument or NotFound for a request the router will not start."""
    if req.model and req.model != limits.model:
        raise NotFound(f"model {req.model!r} is not served here; this router serves {limits.model!r}")
    if len(req.request_id.encode()) > MAX_REQUEST_ID_BYTES:
        raise InvalidArgument("request_id", f"{len(req.request_id.encode())} bytes; at most {MAX_REQUEST_ID_BYTES}")
    kind = req.WhichOneof("input")
    if kind is None:
        raise InvalidArgument("input", "set one of text, chat or token_ids")
    # An empty text is valid (as in vLLM): it tokenizes to the model's BOS, if it has one; only an
    # empty token list is refused (resolve_max_tokens, once the tokenizer answered).
    if kind == "chat" and not req.chat.messages:
        raise InvalidArgument("chat.messages", "needs at least one message")
    if kind == "token_ids":
        ids = req.token_ids.ids
        if not ids:
            raise InvalidArgument("token_ids.ids", "must not be empty")
        bad = next((i for i in ids if i >= limits.vocab_size), None)
        if bad is not None:
            raise InvalidArgument("token_ids.ids", f"id {bad} is outside the vocabulary [0, {limits.vocab_size})")
    if len(req.stop) > limits.max_stop_strings:
        raise InvalidArgument("stop", f"{len(req.stop)} stop strings; at most {limits.max_stop_strings}")
    for i, stop in enumerate(req.stop):
        if not stop:
            raise InvalidArgument(f"stop[{i}]", "must not be empty")
        if len(stop.encode()) > limits.max_stop_string_bytes:
            raise InvalidArgument(f"stop[{i}]", f"{len(stop.encode())} bytes; at most {limits.max_stop_string_bytes}")
    s = req.sampling
    if s.HasField("max_tokens") and not (1 <= s.max_tokens <= limits.max_tokens_limit):
        raise InvalidArgument("sampling.max_tokens", f"{s.max_tokens}; must be in [1, {limits.max_tokens_limit}]")
    if s.HasField("temperature") and not (0.0 <= s.temperature <= 100.0):
        raise InvalidArgument("sampling.temperature", f"{s.temperature}; must be in [0, 100]")
    if s.HasField("top_p") and not (0.0 < s.top_p <= 1.0):
        raise InvalidArgument("sampling.top_p", f"{s.top_p}; must be in (0, 1]")
    if s.HasField("top_logprobs") and s.top_logprobs > 20:
        raise InvalidArgument("sampling.top_logprobs", f"{s.top_logprobs}; must be in [0, 20]")


def resolve_max_tokens(req: router_pb2.RouterGenerateRequest, num_prompt_tokens: int, limits: RequestLimits) -> int:
    """The max_tokens to send to the engine. Raises InvalidArgument when the prompt leaves no room."""
    if num_prompt_tokens == 0:
        field = "token_ids.ids" if req.WhichOneof("input") == "token_ids" else req.WhichOneof("input")
        raise InvalidArgument(field, "the prompt is empty: it tokenizes to no tokens (the model adds no BOS)")
    if num_prompt_tokens > limits.max_prompt_tokens:
        raise InvalidArgument("prompt", f"{num_prompt_tokens} tokens; at most {limits.max_prompt_tokens}")
    room = limits.max_model_len - num_prompt_tokens
    if req.sampling.HasField("max_tokens"):
        if req.sampling.max_tokens > room:
            raise InvalidArgument(
                "sampling.max_tokens", f"prompt ({num_prompt_tokens} tokens) + max_tokens ({req.sampling.max_tokens}) "
                f"= {num_prompt_tokens + req.sampling.max_tokens} exceeds max_model_len {limits.max_model_len}")
        return req.sampling.max_tokens
    if room < 1:
        raise InvalidArgument("prompt", f"{num_prompt_tokens} tokens leave no room to generate within "
                                        f"max_model_len {limits.max_model_len}")
    return min(limits.default_max_tokens, room)
