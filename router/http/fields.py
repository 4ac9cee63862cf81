"""What /v1/completions and /v1/chat/completions share: the OpenAI fields as a RouterGenerateRequest's
sampling and stop settings, and the router's answers as OpenAI finish reasons and usage."""

from __future__ import annotations

from kvmesh.v1 import common_pb2, router_pb2
from router.http.errors import bad_request
from router.http.schemas import SamplingFields

# Optional SamplingParams fields whose OpenAI name is the proto's name.
_SAME_NAME = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
              "seed", "min_tokens")

FINISH_REASONS = {
    common_pb2.FINISH_REASON_STOP_TOKEN: "stop",
    common_pb2.FINISH_REASON_STOP_STRING: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_CANCELLED: "abort",
    common_pb2.FINISH_REASON_ERROR: "error",
}


def _set(msg, name: str, value, param: str | None = None) -> None:
    try:
        setattr(msg, name, value)
    except (ValueError, TypeError):  # outside the proto field's integer range
        raise bad_request(param or name, f"{value} is out of range") from None


def apply_sampling(body: SamplingFields, req: router_pb2.RouterGenerateRequest, *, max_tokens: int | None,
                   max_tokens_param: str = "max_tokens") -> None:
    """Copy the sampling, stop and output settings of an OpenAI body into `req`.

    Raises:
        OpenAIError (400) naming the field for a value no proto field can hold or an unsupported feature.
    """
    if (why := body.unsupported()) is not None:
        raise bad_request(*why)
    s = req.sampling
    for name in _SAME_NAME:
        value = getattr(body, name)
        if value is not None:
            _set(s, name, value)
    if body.top_k is not None:
        if body.top_k < -1:
            raise bad_request("top_k", f"{body.top_k}; must be -1 or 0 (off) or a positive count")
        if body.top_k > 0:
            _set(s, "top_k", body.top_k)
    if max_tokens is not None:
        _set(s, "max_tokens", max_tokens, max_tokens_param)
    if body.stop_token_ids:
        for i, token_id in enumerate(body.stop_token_ids):
            if token_id < 0:
                raise bad_request(f"stop_token_ids[{i}]", f"{token_id}; token ids are >= 0")
        s.stop_token_ids.extend(body.stop_token_ids)
    if body.ignore_eos:
        s.ignore_eos = True
    req.stop.extend(body.stop_list())
    if body.include_stop_str_in_output is not None:
        req.include_stop_string = body.include_stop_str_in_output
    if body.skip_special_tokens is not None:
        req.skip_special_tokens = body.skip_special_tokens
    if body.priority is not None:
        _set(req, "priority", body.priority)
    if body.model:
        req.model = body.model


def request_logprobs(req: router_pb2.RouterGenerateRequest, top: int) -> None:
    """Ask for each token's logprob and `top` candidates (the token records come back with the text)."""
    req.sampling.logprobs = True
    req.sampling.top_logprobs = top
    req.return_tokens = True


def usage(out: router_pb2.RouterGenerateResponse) -> dict:
    u = out.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens}


def finish_reason(out: router_pb2.RouterGenerateResponse) -> str | None:
    """OpenAI's finish_reason for a router response: None until the last one."""
    return FINISH_REASONS.get(out.finish_reason)
