"""ASGI sends for the HTTP front: one JSON body, or server-sent events ending with `data: [DONE]`."""

from __future__ import annotations

import json

_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # proxies (nginx) must pass each event on at once
]


def _dumps(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


async def send_json(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    data = _dumps(body)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


async def start(send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})


async def event(send, obj: dict) -> None:
    await send({"type": "http.response.body", "body": b"data: " + _dumps(obj) + b"\n\n", "more_body": True})


async def done(send) -> None:
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
