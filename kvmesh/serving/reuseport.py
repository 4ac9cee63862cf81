"""One public port for several processes (SO_REUSEPORT), with the port-clash check kept.

kvmesh servers bind with SO_REUSEPORT off (server.server_options), so that a second server on a
taken port fails instead of silently taking half its connections. Several router workers must
share their port, so they bind with it on; `reserve_port` keeps the clash check for the group:

1. the parent binds the port *without* SO_REUSEPORT (SO_REUSEADDR only, which on Linux does not
   let a TCP bind share a port that another socket holds): this fails with EADDRINUSE when anything
   else holds the port, another worker group included, so a clash is found before a worker starts;
   port 0 resolves to one free port here, which every worker then binds;
2. then it sets SO_REUSEPORT on that bound socket and holds it, never listening: Linux checks the
   flag of the sockets already bound when a later socket binds, so the workers (SO_REUSEPORT on,
   same user) can join, while a later server without the flag (every other kvmesh server, a second
   `--workers` router, most programs) still gets EADDRINUSE. A socket that is bound but not
   listening receives no connections: the kernel spreads them over the workers' listening sockets.

What this cannot stop: a process of the same user that sets SO_REUSEPORT itself (grpc's default,
gunicorn --reuse-port) can join the group, as with any SO_REUSEPORT server; Linux refuses one of
another user.
"""

from __future__ import annotations

import socket


class PortTaken(RuntimeError):
    """The port is held by another socket; the message names the address and the fix."""


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind host:port (0 = any free port) for a group of SO_REUSEPORT listeners and hold it.

    Returns:
        The bound, non-listening socket; its port is `getsockname()[1]`. Close it when the group stops.
    Raises:
        PortTaken when another socket holds the port.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a previous run's TIME_WAIT is no clash
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PortTaken(f"{host}:{port}: {exc.strerror or exc}: another server holds it; pick another port "
                        "(0 = any free port)") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # after bind: see the module docstring
    return sock
