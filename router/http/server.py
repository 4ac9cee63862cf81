"""uvicorn on the router's own event loop: the HTTP front starts after the gRPC server and drains
with it.

The router process owns signals (SIGTERM/SIGINT start its drain), so uvicorn installs none; the
router binds the socket itself so that port 0 works and the bound port can be reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers (the router's drain handles SIGTERM and SIGINT)."""

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        pass

    @contextlib.contextmanager
    def capture_signals(self):  # uvicorn >= 0.29
        yield


def _bind(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:  # a router worker: the parent reserved the port (kvmesh.serving.reuseport)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RuntimeError(f"HTTP front: could not bind {host}:{port}: {exc.strerror}") from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class HttpFront:
    """The running HTTP server. `start()` returns the bound port; `stop()` drains."""

    def __init__(self, app, *, host: str, port: int, grace_s: float, reuse_port: bool = False):
        self._app, self._host, self._port, self._grace_s = app, host, port, grace_s
        self._reuse_port = reuse_port
        self._server: _Server | None = None
        self._task: asyncio.Task | None = None
        self.port: int | None = None

    async def start(self) -> int:
        sock = _bind(self._host, self._port, self._reuse_port)
        config = uvicorn.Config(self._app, log_config=None, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=max(1, int(self._grace_s)), timeout_keep_alive=30)
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="http-front")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("HTTP front: uvicorn exited during startup")
            await asyncio.sleep(0.01)
        self.port = sock.getsockname()[1]
        log.info("HTTP (OpenAI API) listening on %s:%d", self._host, self.port)
        return self.port

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish for up to the grace period, then close."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), self._grace_s + 5.0)
        except TimeoutError:
            self._server.force_exit = True
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
