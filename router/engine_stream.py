"""The router's requests to one engine on one shared GenerateStream per engine channel.

A Python gRPC message costs about 100 us of CPU on each side, and a Generate stream per request
costs one engine message per request per step. Here every request to the engine rides one
long-lived GenerateStream: the engine sends each step's tokens of all of them in one message, the
reader fans it out to the requests, and whatever requests and cancels of all requests gathered
since the last write go out in one message.

Each request is a StreamedCall, used as the per-request grpc.aio Generate call it replaces:
`read()` returns its next GenerateResponse, or grpc.aio.EOF after the last one, and raises an
AioRpcError for a rejection (the engine's status for that request, details included), a deadline
(DEADLINE_EXCEEDED; the request is cancelled on the engine) or a failure of the stream (UNAVAILABLE
naming the stream's status; every request on it fails, as every Generate call would when the engine
goes away). `cancel()` tells the engine to abort the request and forgets it; `abort()` tells the
engine while still reading the request's last response (a stop string: its usage).

EngineClient holds the current stream (router.shared_call.CurrentCall): it opens with the first
request, and a new one opens for the next request after a failure.
"""

from __future__ import annotations

import asyncio
import collections
import logging

import grpc
from google.rpc import status_pb2

from kvmesh.serving.errors import STATUS_DETAILS_KEY, status_code
from kvmesh.serving.event_loop import deadline_timer_s
from kvmesh.v1 import engine_pb2
from router.shared_call import SharedCall

log = logging.getLogger(__name__)

# Requests beyond this many bytes wait for the next message, so that one message of many long
# prompts stays far below the engine's receive limit (16 MiB by default): a message too large would
# fail the stream and every request on it. A request larger than this goes alone.
MESSAGE_BUDGET_BYTES = 1 << 20
_CANCELLED = object()  # a StreamedCall's last item after cancel()


def rejection_error(rejection: engine_pb2.RequestRejection) -> grpc.aio.AioRpcError:
    """A request's rejection as the error its Generate call would have ended with."""
    code = status_code(rejection.code)
    trailing = grpc.aio.Metadata()
    if rejection.details:
        status = status_pb2.Status(code=rejection.code, message=rejection.message, details=rejection.details)
        trailing.add(STATUS_DETAILS_KEY, status.SerializeToString())
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, rejection.message)


class StreamedCall:
    """One request on a shared GenerateStream, read like a Generate call."""

    __slots__ = ("request_id", "_stream", "_items", "_waiter", "_ended", "_timer")

    def __init__(self, stream: "EngineStream", request_id: str, timeout: float | None):
        self.request_id = request_id
        self._stream = stream
        self._items: collections.deque = collections.deque()  # GenerateResponse or an AioRpcError
        self._waiter: asyncio.Future | None = None
        self._ended = False  # no more items will come (finished, failed, cancelled)
        loop = asyncio.get_running_loop()
        # One timer for the whole request (cheaper than a timeout around every read).
        self._timer = None if timeout is None else loop.call_later(deadline_timer_s(timeout), self._expire)

    def deliver(self, item) -> None:
        """A response or an error for this request (the stream's reader; the last item of a request
        is its finished response or an error)."""
        if self._ended:
            return
        self._items.append(item)
        if item is _CANCELLED or isinstance(item, Exception) or item.finish_reason:
            self._end()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _arrived(self) -> bool:
        """Wait until an item is queued (True) or the request ended with none left (False)."""
        while not self._items:
            if self._ended:
                return False
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return True

    async def read(self):
        """The next response; grpc.aio.EOF after the last. Raises grpc.aio.AioRpcError."""
        if not await self._arrived():
            return grpc.aio.EOF
        item = self._items[0]
        if item is _CANCELLED:
            raise asyncio.CancelledError()  # stays queued: every later read raises it too
        self._items.popleft()
        if isinstance(item, Exception):
            raise item
        return item

    async def next_batch(self) -> list:
        """Every item received and not read yet, at least one (waiting for one): responses, the
        last of them the finished one, or then the error that ended the request, or grpc.aio.EOF
        once it ended. For a reader that handles what queued up at once (router.stream)."""
        if not await self._arrived():
            return [grpc.aio.EOF]
        if self._items[0] is _CANCELLED:
            raise asyncio.CancelledError()
        items = list(self._items)
        self._items.clear()
        return items

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        while (response := await self.read()) is not grpc.aio.EOF:
            yield response

    def cancel(self) -> None:
        """Abort the request on the engine (unless it ended) and stop reading it: a read waiting or
        to come raises asyncio.CancelledError, as on a grpc.aio call cancelled locally."""
        if not self._ended:
            self._stream.cancel(self.request_id)
            self._items.clear()
            self.deliver(_CANCELLED)

    def abort(self) -> None:
        """Abort the request on the engine, still reading its responses up to its last."""
        if not self._ended:
            self._stream.send_cancel(self.request_id)

    def _expire(self) -> None:
        self._timer = None
        if not self._ended:
            self._stream.cancel(self.request_id)
            self.deliver(grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(),
                                              grpc.aio.Metadata(), "Deadline Exceeded"))

    def _end(self) -> None:
        self._ended = True
        self._stream.forget(self.request_id)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class EngineStream(SharedCall):
    """One GenerateStream call with its writer and reader tasks. Lives until it fails or is closed."""

    def __init__(self, stub):
        self._call = stub.GenerateStream()
        self._peer = "engine"
        self._calls: dict[str, StreamedCall] = {}  # requests sent (or to be sent) and not ended
        self._requests: list[engine_pb2.GenerateRequest] = []  # to go out with the next message
        self._cancels: list[str] = []
        self.failure: grpc.aio.AioRpcError | None = None
        self.num_messages = 0  # messages written (requests and cancels per message show the coalescing)
        self._start_tasks("generate-stream")

    @property
    def num_live(self) -> int:
        return len(self._calls)

    def start(self, request: engine_pb2.GenerateRequest, timeout: float | None) -> StreamedCall:
        """Send a request with the next message; its responses arrive on the returned call."""
        call = StreamedCall(self, request.request_id, timeout)
        if self.failure is not None:
            call.deliver(self.failure)
            return call
        assert request.request_id not in self._calls, f"request {request.request_id} sent twice"
        self._calls[request.request_id] = call
        self._requests.append(request)
        self._wake.set()
        return call

    def send_cancel(self, request_id: str) -> None:
        """Tell the engine to abort the request (its last response still comes)."""
        if self.failure is None:
            self._cancels.append(request_id)
            self._wake.set()

    def cancel(self, request_id: str) -> None:
        """Abort the request on the engine and drop whatever it still sends."""
        self._calls.pop(request_id, None)
        unsent = next((i for i, r in enumerate(self._requests) if r.request_id == request_id), None) \
            if self._requests else None
        if unsent is not None:
            del self._requests[unsent]  # never sent: nothing to cancel on the engine
        else:
            self.send_cancel(request_id)

    def forget(self, request_id: str) -> None:
        self._calls.pop(request_id, None)

    def _outgoing(self):
        while self._requests or self._cancels:
            message = engine_pb2.GenerateStreamRequest(requests=self._take_requests(),
                                                       cancel_request_ids=self._cancels)
            self._cancels = []
            self.num_messages += 1
            yield message

    def _take_requests(self) -> list[engine_pb2.GenerateRequest]:
        """The pending requests for one message, oldest first, within MESSAGE_BUDGET_BYTES."""
        requests, size = self._requests, 0
        for i, request in enumerate(requests):
            size += len(request.prompt_token_ids) * 3  # ids dominate: at most ~3 bytes each below 2^21
            if i and size > MESSAGE_BUDGET_BYTES:
                self._requests = requests[i:]
                return requests[:i]
        self._requests = []
        return requests

    def _on_message(self, message: engine_pb2.GenerateStreamResponse) -> None:
        calls = self._calls
        for response in message.responses:
            call = calls.get(response.request_id)
            if call is not None:
                call.deliver(response)
        for rejection in message.rejections:
            call = calls.get(rejection.request_id)
            if call is not None:
                call.deliver(rejection_error(rejection))

    def _fail(self, why: str) -> None:
        if self.failure is not None:
            return
        self.failure = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                            f"the engine's GenerateStream failed: {why}")
        if self._calls:
            log.warning("%s; %d requests on it fail", self.failure.details(), len(self._calls))
        for call in list(self._calls.values()):
            call.deliver(self.failure)
        self._calls.clear()
        self._requests.clear()
        self._cancels.clear()
        self._call.cancel()
