"""The router's OpenAI-compatible HTTP front: routes, auth and error handlers (FastAPI).

    POST /v1/completions        text or token-id prompt; streaming (SSE) or not
    POST /v1/chat/completions   messages, rendered with the model's chat template
    GET  /v1/models             the served model ( /v1/models/{id} for one)
    GET  /health                200 while the router can serve, 503 otherwise (no auth: for probes)

It shares the gRPC servicer's Orchestrator and Deployment: the same limits, replica choice,
cancellation and metrics; no gRPC hop. A bearer token, when configured, is checked in constant time
(router.auth) on every route but /health.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

import kvmesh
from router.auth import token_matches
from router.deployment import Deployment
from router.http.chat import ChatRenderer, chat_request
from router.http.completions import CompletionRenderer, completion_request
from router.http.errors import OpenAIError, bad_request
from router.http.generation import GenerationResponse
from router.http.logprobs import TokenTexts
from router.http.schemas import ChatCompletionRequest, CompletionRequest
from router.orchestrator import Orchestrator

REQUEST_ID_HEADER = "x-request-id"
MAX_BODY_BYTES = 16 * 1024 * 1024  # the gRPC front's default message limit


@dataclass
class FrontParts:
    """What the HTTP front shares with the router process."""

    orchestrator: Orchestrator
    deployment: Deployment
    token_texts: TokenTexts
    is_serving: Callable[[], bool]
    auth_token: str | None = None


def _param(loc: tuple) -> str:
    """A pydantic error location as an OpenAI param: ("body", "messages", 0, "role") -> messages[0].role."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _validation_error(errors: list[dict]) -> OpenAIError:
    """The first pydantic error as a 400 naming its field."""
    first = errors[0]
    param = _param(tuple(first.get("loc", ()))) or "body"
    if first.get("type") == "missing":
        return bad_request(param, "is required")
    got = first.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    return bad_request(param, f"{first['msg']}{shown}")


async def parse_body(request: Request, model: type[BaseModel]):
    """The JSON body as `model`, whatever the Content-Type says (curl -d sends a form type).

    Raises:
        OpenAIError: 413 past MAX_BODY_BYTES, 400 for malformed JSON or a field that does not validate.
    """
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise OpenAIError(413, f"the body is {declared} bytes; at most {MAX_BODY_BYTES}")
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise OpenAIError(413, f"the body is {len(raw)} bytes; at most {MAX_BODY_BYTES}")
    try:
        obj = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise OpenAIError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise OpenAIError(400, f"the body must be a JSON object, not {type(obj).__name__}")
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise _validation_error(exc.errors()) from None


def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return OpenAIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", type=kind).response()


def build_app(parts: FrontParts) -> FastAPI:
    app = FastAPI(title="kvmesh", version=kvmesh.__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(OpenAIError, lambda request, exc: exc.response())
    app.add_exception_handler(StarletteHTTPException, _http_error)
    expected = parts.auth_token.encode() if parts.auth_token else None

    def authorized(request: Request) -> None:
        if expected is not None and not token_matches(request.headers.items(), expected):
            raise OpenAIError(401, "missing or invalid bearer token (header 'Authorization: Bearer <token>')",
                              type="authentication_error", code="invalid_api_key")

    def model_name() -> str:
        return parts.deployment.model

    @app.get("/health")
    async def health():
        ok = parts.is_serving()
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    def model_card() -> dict:
        card = {"id": model_name(), "object": "model", "created": int(time.time()), "owned_by": "kvmesh"}
        if parts.deployment.max_model_len:
            card["max_model_len"] = parts.deployment.max_model_len
        return card

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def list_models():
        return {"object": "list", "data": [model_card()] if model_name() else []}

    @app.get("/v1/models/{model:path}", dependencies=[Depends(authorized)])
    async def get_model(model: str):
        if model != model_name():
            raise OpenAIError(404, f"model {model!r} is not served here; this router serves {model_name()!r}",
                              type="not_found_error", param="model", code="model_not_found")
        return model_card()

    def respond(req, renderer, body, request: Request) -> GenerationResponse:
        include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
        return GenerationResponse(parts.orchestrator, model_name(), req, renderer, stream=body.stream,
                                  include_usage=include_usage, user=body.user)

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(request: Request):
        body = await parse_body(request, CompletionRequest)
        req = completion_request(body, request.headers.get(REQUEST_ID_HEADER, ""))
        renderer = CompletionRenderer(body.model or model_name(), parts.token_texts, body.logprobs is not None)
        return respond(req, renderer, body, request)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(request: Request):
        body = await parse_body(request, ChatCompletionRequest)
        req = chat_request(body, request.headers.get(REQUEST_ID_HEADER, ""))
        renderer = ChatRenderer(body.model or model_name(), parts.token_texts, body.logprobs)
        if body.max_completion_tokens is not None:
            renderer.param_names = {"sampling.max_tokens": "max_completion_tokens"}
        return respond(req, renderer, body, request)

    return app
