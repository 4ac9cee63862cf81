"""The OpenAI request bodies the HTTP front accepts (pydantic), with vLLM's common extensions.

Shapes only: values are range-checked where the router checks them (router.validation, the engine's
SamplingParams), so gRPC and HTTP clients get the same limits and messages. Fields that OpenAI
defines but kvmesh does not do yet (n > 1, echo, best_of, logit_bias, tools, non-text content) are
rejected by name (`unsupported()`), never silently ignored; unknown extra fields are ignored, as
OpenAI-compatible servers do.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False  # one more chunk before [DONE] with usage and no choices


class SamplingFields(BaseModel):
    """What /v1/completions and /v1/chat/completions share."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # None or "" = the router's only model
    max_tokens: int | None = Field(None, ge=1)  # absent = the router's default (GetInfo)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # -1 or 0 = off (vLLM spells it -1)
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = Field(None, ge=0, lt=1 << 64)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # the end user, recorded on the request span
    # vLLM extensions
    ignore_eos: bool = False
    min_tokens: int | None = Field(None, ge=0)
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    priority: int | None = None
    logit_bias: dict[str, float] | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def unsupported(self) -> tuple[str, str] | None:
        """(field, why) for the first requested feature kvmesh does not do; None when all are fine."""
        if self.n != 1:
            return "n", f"{self.n}: only n=1 is supported (send n requests, each with its own seed)"
        if self.logit_bias:
            return "logit_bias", "is not supported"
        return None


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    # A string, a list of token ids, or a one-element list of either (one prompt per request).
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)  # top candidates per token; 0 = the chosen token only
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.echo:
            return "echo", "is not supported (the response holds the completion only)"
        if self.best_of not in (None, 1):
            return "best_of", f"{self.best_of}: only best_of=1 is supported"
        if self.suffix:
            return "suffix", "is not supported (no fill-in-the-middle)"
        return super().unsupported()


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str = "text"


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessageIn]
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    add_generation_prompt: bool = True  # vLLM extension
    response_format: ResponseFormat | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.tools:
            return "tools", "tool calling is not supported"
        if self.tool_choice not in (None, "none"):
            return "tool_choice", "tool calling is not supported"
        if self.response_format is not None and self.response_format.type != "text":
            return "response_format", f"type {self.response_format.type!r} is not supported; only 'text'"
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs", "needs logprobs=true"
        for i, m in enumerate(self.messages):
            for j, part in enumerate(m.content if isinstance(m.content, list) else []):
                if part.type != "text":
                    return f"messages[{i}].content[{j}].type", f"{part.type!r}: only 'text' parts are supported"
        return super().unsupported()
