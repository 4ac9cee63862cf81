"""A free loopback port for a test's service (bound and released: nothing else is racing for it here)."""

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
