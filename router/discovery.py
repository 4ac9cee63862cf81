"""Engine discovery: a static list ("a:1,b:2") or DNS names ("dns:///engines.svc:50051") re-resolved.

A `dns:///` target stands for every address its name resolves to (a Kubernetes headless Service
gives one A record per ready pod), so the set is re-resolved every `refresh_s` and handed to the
pool, which starts and retires watchers. A failed resolution keeps the previous set: a DNS hiccup
must not empty the engine table.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

DNS_PREFIX = "dns:///"


@dataclass(frozen=True, slots=True)
class Target:
    """One entry of --engines: a fixed address, or a DNS name to resolve."""

    host: str
    port: int
    dns: bool

    def __str__(self) -> str:
        return f"{DNS_PREFIX if self.dns else ''}{_join(self.host, self.port)}"


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _split(hostport: str, text: str) -> tuple[str, int]:
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        port_text = rest.removeprefix(":")
    else:
        host, _, port_text = hostport.rpartition(":")
    if not host or not port_text.isdigit() or not (0 < int(port_text) < 65536):
        raise ValueError(f"engine target {text!r}: use HOST:PORT or dns:///NAME:PORT")
    return host, int(port_text)


def parse_targets(spec: str | list[str]) -> list[Target]:
    """Parse --engines: comma-separated HOST:PORT and dns:///NAME:PORT entries.

    Raises:
        ValueError naming the bad entry.
    """
    parts = spec.split(",") if isinstance(spec, str) else [p for s in spec for p in s.split(",")]
    targets = []
    for part in (p.strip() for p in parts):
        if not part:
            continue
        dns = part.startswith(DNS_PREFIX)
        host, port = _split(part.removeprefix(DNS_PREFIX), part)
        targets.append(Target(host, port, dns))
    if not targets:
        raise ValueError("no engine targets: pass --engines HOST:PORT[,HOST:PORT...] or dns:///NAME:PORT")
    return targets


async def resolve(targets: list[Target]) -> set[str] | None:
    """Addresses for all targets; None when any DNS name failed to resolve (keep the old set)."""
    loop = asyncio.get_running_loop()
    addresses = set()
    for t in targets:
        if not t.dns:
            addresses.add(_join(t.host, t.port))
            continue
        try:
            infos = await loop.getaddrinfo(t.host, t.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            log.warning("resolving %s failed: %s", t, exc)
            return None
        addresses.update(_join(info[4][0], t.port) for info in infos)
    return addresses


class Discovery:
    """Feeds the resolved engine addresses to `on_addresses`, now and every refresh_s (DNS only)."""

    def __init__(self, targets: list[Target], on_addresses: Callable[[set[str]], None], refresh_s: float,
                 resolver=resolve):
        self._targets = targets
        self._on_addresses = on_addresses
        self._refresh_s = refresh_s
        self._resolve = resolver  # async (targets) -> set of addresses, or None to keep the last set
        self._task: asyncio.Task | None = None
        self._last: set[str] | None = None

    async def start(self) -> None:
        await self.refresh()
        if any(t.dns for t in self._targets):
            self._task = asyncio.create_task(self._loop(), name="discovery")

    async def refresh(self) -> None:
        addresses = await self._resolve(self._targets)
        if addresses is not None and addresses != self._last:
            log.info("engines: %s", ", ".join(sorted(addresses)) or "none")
            self._last = addresses
            self._on_addresses(addresses)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            await self.refresh()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
