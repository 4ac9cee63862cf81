"""kvmesh.v1.Router: the public gRPC surface. Thin: the work is in Orchestrator and Deployment."""

from __future__ import annotations

import contextlib

import grpc

from kvmesh.telemetry.router import RouterRequestTrace
from kvmesh.v1 import common_pb2, router_pb2, router_pb2_grpc
from router.deployment import Deployment
from router.drain import StreamDrain
from router.orchestrator import Orchestrator


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, orchestrator: Orchestrator, deployment: Deployment, drain: StreamDrain | None = None):
        self._orch = orchestrator
        self._deployment = deployment
        self._drain = drain or StreamDrain()

    async def Generate(self, request: router_pb2.RouterGenerateRequest, context):
        with RouterRequestTrace(request, self._deployment.model) as rec:  # GenAI span attributes, metrics
            # Closed here when the client goes away, not later by the garbage collector.
            generate = self._drain.guard(self._orch.generate(request, context.time_remaining()))
            async with contextlib.aclosing(generate) as responses:
                async for out in responses:
                    rec.response(out)
                    yield out
                    if (out.finish_reason == common_pb2.FINISH_REASON_ERROR
                            and out.error.reason == common_pb2.ERROR_REASON_DEADLINE_EXCEEDED):
                        # The router's own timer ended it (a hair after the client's deadline): the
                        # status says so too. With OK here a client whose own timer ran late (a loaded
                        # host) saw a call that succeeded, with the deadline only in the last message.
                        context.set_code(grpc.StatusCode.DEADLINE_EXCEEDED)
                        context.set_details(out.error.message)

    async def GetInfo(self, request: common_pb2.GetInfoRequest, context) -> common_pb2.ServiceInfo:
        return self._deployment.service_info()

    async def ListModels(self, request: router_pb2.ListModelsRequest, context) -> router_pb2.ListModelsResponse:
        return self._deployment.list_models()
