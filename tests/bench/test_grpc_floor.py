"""bench/grpc_floor.py in its smallest mode: each measurement, on loopback TCP and on unix-domain
sockets, between real processes (the round trips, the raw-socket pair, both relays)."""

from __future__ import annotations

import argparse

from bench import grpc_floor


def test_every_measurement_runs_on_both_transports():
    args = argparse.Namespace(round_trips=5, pace_ms=0.0, streams=2, tokens=3, step_ms=1.0)
    for transport in ("tcp", "unix"):
        result = grpc_floor.measure("kvmesh", "asyncio", transport, args)
        assert result["transport"] == transport
        for key in ("unary_rtt_p50_ms", "bidi_message_pair_rtt_p50_ms", "raw_socket_pair_rtt_p50_ms"):
            assert result[key] > 0, key
        # every token of every stream crossed the relay, on both backends
        assert result["relay"]["tokens"] == result["relay_multiplexed_backend"]["tokens"] == 2 * 3


def test_bind_addresses():
    assert grpc_floor.bind_address("tcp", "echo") == "127.0.0.1:0"
    unix = grpc_floor.bind_address("unix", "echo")
    assert unix.startswith("unix:/") and unix.endswith("/echo.sock")
