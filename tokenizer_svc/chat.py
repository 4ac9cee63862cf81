"""ApplyChatTemplate: request messages to the rendered prompt and its ids, via transformers.

Rendering goes through the transformers tokenizer's own `apply_chat_template` (its sandboxed Jinja
environment, its globals such as raise_exception and tojson, its special-token variables), so a
prompt is byte for byte what transformers renders for the same conversation. The ids come from
the same call with `sanitize_control_tokens=True`: control tokens written by the template become
special ids, while control-token text inside user content, tools or kwargs stays plain text.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import jinja2

from kvmesh.serving.errors import FailedPrecondition, InvalidArgument

# Parameters of apply_chat_template that template_kwargs_json must not reach (they would change
# what the call returns rather than what the template sees).
_RESERVED_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "sanitize_control_tokens", "padding", "truncation", "max_length",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
})


# transformers' tokenizer flips settings on its shared `tokenizers` object while it encodes
# (encode_special_tokens, between the user's pieces and the template's), so two threads encoding at
# once could each see the other's setting. One chat render at a time per process.
_HF_LOCK = threading.Lock()


@dataclass(slots=True)
class ChatRequest:
    """ApplyChatTemplateRequest, decoded and validated."""

    messages: list[dict]
    tools: list[dict] | None
    add_generation_prompt: bool
    tokenize: bool
    kwargs: dict


def _json_object(field: str, text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(field, f"not valid JSON ({exc.msg} at position {exc.pos})") from None
    if not isinstance(value, dict):
        raise InvalidArgument(field, f"must be a JSON object, got {type(value).__name__}")
    return value


def parse_chat_request(request) -> ChatRequest:
    """Validate an ApplyChatTemplateRequest and turn it into plain Python values.

    Raises:
        InvalidArgument naming the field (messages[i].role, tools_json[i], template_kwargs_json, ...).
    """
    if not request.messages:
        raise InvalidArgument("messages", "must hold at least one message")
    messages = []
    for i, m in enumerate(request.messages):
        if not m.role:
            raise InvalidArgument(f"messages[{i}].role", "must not be empty")
        message: dict = {"role": m.role, "content": m.content}
        if m.HasField("name"):
            message["name"] = m.name
        if m.HasField("tool_call_id"):
            message["tool_call_id"] = m.tool_call_id
        if m.tool_calls_json:
            message["tool_calls"] = [_json_object(f"messages[{i}].tool_calls_json[{j}]", c)
                                     for j, c in enumerate(m.tool_calls_json)]
        messages.append(message)
    tools = [_json_object(f"tools_json[{i}]", t) for i, t in enumerate(request.tools_json)] or None
    kwargs = {}
    if request.HasField("template_kwargs_json"):
        kwargs = _json_object("template_kwargs_json", request.template_kwargs_json)
        reserved = sorted(_RESERVED_KWARGS & kwargs.keys())
        if reserved:
            raise InvalidArgument("template_kwargs_json", f"may not set {', '.join(reserved)}")
    return ChatRequest(
        messages=messages, tools=tools,
        add_generation_prompt=request.add_generation_prompt if request.HasField("add_generation_prompt") else True,
        tokenize=request.tokenize if request.HasField("tokenize") else True, kwargs=kwargs)


def render_chat(hf_tokenizer, req: ChatRequest) -> tuple[str, list[int]]:
    """Render (and, if asked, tokenize) the conversation. Blocking: run it off the event loop.

    Raises:
        FailedPrecondition when the tokenizer has no chat template;
        InvalidArgument when the template rejects the conversation (raise_exception, bad types).
    """
    if not getattr(hf_tokenizer, "chat_template", None):
        raise FailedPrecondition("this model's tokenizer has no chat template: send text or token ids instead "
                                 "of chat messages")
    common = dict(conversation=req.messages, tools=req.tools, add_generation_prompt=req.add_generation_prompt,
                  **req.kwargs)
    try:
        with _HF_LOCK:
            return _render(hf_tokenizer, req, common)
    except jinja2.TemplateError as exc:
        # raise_exception() in a template ("roles must alternate ...") and Jinja errors on the input.
        raise InvalidArgument("messages", f"the chat template rejected the conversation: {exc}") from None
    except (ValueError, TypeError, KeyError) as exc:
        # transformers raises these for conversations it cannot take (an empty one, a control
        # token it cannot sanitize) and Jinja for values of the wrong type.
        raise InvalidArgument("messages", f"the chat template could not render the conversation: {exc}") from None


def _render(hf_tokenizer, req: ChatRequest, common: dict) -> tuple[str, list[int]]:
    prompt = hf_tokenizer.apply_chat_template(tokenize=False, **common)
    ids: Sequence[int] = []
    if req.tokenize:
        ids = hf_tokenizer.apply_chat_template(tokenize=True, return_dict=False, sanitize_control_tokens=True,
                                               **common)
    return prompt, list(ids)
