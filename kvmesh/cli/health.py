"""`kvmesh health [HOST:PORT]`: ask a service's grpc.health.v1 and exit 0 only when it is SERVING.

The container health check of docker-compose (the images carry grpcio, so no probe binary is needed);
Kubernetes uses its native gRPC probes instead. Exit codes: 0 SERVING, 1 NOT_SERVING or unknown
service, 2 unreachable.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("health", help="exit 0 when a service's gRPC health check says SERVING",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("address", nargs="?", default=None,
                   help="HOST:PORT of the service (default 127.0.0.1 and --port)")
    p.add_argument("--port", type=int, default=50051, help="port when no address is given")
    p.add_argument("--service", default="", help="health service name; empty = the whole server")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer")


def run(args: argparse.Namespace) -> int:
    address = args.address or f"127.0.0.1:{args.port}"
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as exc:
            code = exc.code()
            print(f"{address}: {code.name if code else 'error'}: {exc.details()}", file=sys.stderr)
            return 1 if code == grpc.StatusCode.NOT_FOUND else 2
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1
