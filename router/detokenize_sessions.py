"""The router's detokenize sessions on one shared DetokenizeSessions stream per tokenizer channel.

gRPC in Python costs about 150 us of CPU per message sent or received, and the per-request
DetokenizeStream costs two messages per request per batch of ids. Here every request's session
rides one long-lived stream: whatever ids of all requests arrived since the last send go out in
one message, and the tokenizer answers with one message holding every session's new text. At
most `max_in_flight` messages are unanswered at a time, so that while one is with the tokenizer
the next batch of every request gathers (the engine streams keep flowing meanwhile: router.stream).
No exception for a request's first ids (its time to first token): a second message in flight for
them splits each wave of opens at 64 streams into more, smaller messages, +28% tokenizer and +6%
router CPU per token (bench/results/overhead-cpu-2026-12-01-ab-first-batch-bypass.json).

A session is opened lazily: its open travels with its first ids, so it costs no message of its own.
When the stream fails, every session on it fails with UNAVAILABLE naming the status, and the next
session opens a new stream (the channel reconnects by itself).
"""

from __future__ import annotations

import asyncio
import itertools

from kvmesh.serving.errors import DeadlineExceeded, ServiceError, Unavailable, with_status
from kvmesh.serving.event_loop import deadline_timer_s
from kvmesh.v1 import router_pb2, tokenizer_pb2
from router.shared_call import CurrentCall, SharedCall


# Messages sent and not yet answered. One gathers the most per message (the fewest messages, the
# least CPU); a session waits at most one round trip for the message ahead of its batch.
MAX_IN_FLIGHT = 1
# Inputs beyond this many bytes wait for the next message: one message stays far below any
# receive limit (16 MiB by default), since a message too large would fail the stream and every
# session on it. Only opens with long prompts come near it; an input larger than this goes alone.
MESSAGE_BUDGET_BYTES = 1 << 20


def start_message(prompt_ids: list[int], request: router_pb2.RouterGenerateRequest) -> tokenizer_pb2.DetokenizeStreamStart:
    """A request's detokenization settings, as both stream kinds open a session."""
    start = tokenizer_pb2.DetokenizeStreamStart(prompt_token_ids=prompt_ids, stop=request.stop)
    if request.HasField("include_stop_string"):
        start.include_stop_string = request.include_stop_string
    if request.HasField("skip_special_tokens"):
        start.skip_special_tokens = request.skip_special_tokens
    return start


def refused(error) -> ServiceError:
    """A session's refused input (SessionUpdate.error) as the ServiceError it stands for."""
    return with_status(error.code, f"tokenizer refused the detokenize session: {error.message}")


class SharedStream(SharedCall):
    """One DetokenizeSessions call and its writer and reader tasks. Lives until it fails or is closed."""

    def __init__(self, stub, max_in_flight: int = MAX_IN_FLIGHT):
        self._call = stub.DetokenizeSessions()
        self._peer = "tokenizer"
        self._max_in_flight = max_in_flight
        self._in_flight = 0
        self._pending: dict[int, tokenizer_pb2.SessionInput] = {}  # to go out with the next message
        self._waiting: dict[int, asyncio.Future] = {}  # session id -> its update, once answered
        self.failure: ServiceError | None = None
        self.num_messages = 0  # request messages sent (the coalescing shows as inputs per message)
        self.num_inputs = 0
        self._start_tasks("detokenize-sessions")

    def send(self, inp: tokenizer_pb2.SessionInput) -> asyncio.Future:
        """Queue a session's input for the next message; the future gets its update (or the stream's failure)."""
        if self.failure is not None:
            raise self.failure
        assert inp.session_id not in self._waiting, "one input per session at a time"
        future = asyncio.get_running_loop().create_future()
        self._pending[inp.session_id] = inp
        self._waiting[inp.session_id] = future
        if self._in_flight < self._max_in_flight:  # else the reader wakes the writer with the answer
            self._wake.set()
        return future

    def cancel(self, session_id: int) -> None:
        """Forget a session and tell the tokenizer to drop it, unless its open has not gone out yet."""
        self._waiting.pop(session_id, None)
        unsent = self._pending.pop(session_id, None)
        if self.failure is None and (unsent is None or not unsent.HasField("open")):
            self._pending[session_id] = tokenizer_pb2.SessionInput(session_id=session_id, cancel=True)
            if self._in_flight < self._max_in_flight:
                self._wake.set()

    def _outgoing(self):
        if self._pending and self._in_flight < self._max_in_flight:  # else the reader wakes the writer
            inputs = self._take_inputs()
            self._in_flight += 1
            self.num_messages += 1
            self.num_inputs += len(inputs)
            yield tokenizer_pb2.DetokenizeSessionsRequest(inputs=inputs)

    def _take_inputs(self) -> list[tokenizer_pb2.SessionInput]:
        """The pending inputs for one message, oldest first, within MESSAGE_BUDGET_BYTES."""
        inputs, size = [], 0
        for inp in self._pending.values():
            size += inp.ByteSize() if inp.HasField("open") else 0  # only opens carry much (the prompt)
            if inputs and size > MESSAGE_BUDGET_BYTES:
                break
            inputs.append(inp)
        if len(inputs) == len(self._pending):
            self._pending = {}
        else:
            for inp in inputs:
                del self._pending[inp.session_id]
        return inputs

    def _on_message(self, response) -> None:
        self._in_flight -= 1
        for update in response.updates:
            future = self._waiting.pop(update.session_id, None)
            if future is not None and not future.done():
                future.set_result(update)
        if self._pending:
            self._wake.set()

    def _fail(self, why: str) -> None:
        if self.failure is not None:
            return
        self.failure = Unavailable(f"tokenizer detokenize stream failed: {why}")
        self._fail_all(self.failure, self._waiting, "sessions")
        self._pending.clear()
        self._call.cancel()


class DetokenizeSessions:
    """The router's sessions on one tokenizer channel: the current SharedStream, replaced when it fails."""

    def __init__(self, stub, max_in_flight: int = MAX_IN_FLIGHT):
        self._current = CurrentCall(lambda: SharedStream(stub, max_in_flight))
        self._ids = itertools.count(1)

    def stream(self) -> SharedStream:
        return self._current.get()

    def session(self, timeout: float | None) -> "SharedSession":
        return SharedSession(self, next(self._ids), timeout)

    async def close(self) -> None:
        await self._current.close()


class SharedSession:
    """One request's detokenization on the shared stream. Same use as tokenizer_client.DetokenizeCall:
    start, then one update per batch of ids (lockstep per session), then finish; close always."""

    def __init__(self, owner: DetokenizeSessions, session_id: int, timeout: float | None):
        self._owner = owner
        self._id = session_id
        self._deadline = None if timeout is None else asyncio.get_running_loop().time() + deadline_timer_s(timeout)
        self._open: tokenizer_pb2.DetokenizeStreamStart | None = None
        self._stream: SharedStream | None = None  # the stream the session was opened on
        self.done = False

    async def start(self, prompt_ids: list[int], request: router_pb2.RouterGenerateRequest) -> None:
        """Nothing is sent yet: the open travels with the first batch of ids."""
        self._open = start_message(prompt_ids, request)

    async def push(self, ids: list[int], finish: bool = False) -> tokenizer_pb2.SessionUpdate:
        """Detokenize a batch of ids; with finish, the generation's last batch: the session ends with it."""
        return await self._send(tokenizer_pb2.SessionInput(session_id=self._id, token_ids=ids, finish=finish))

    async def finish(self) -> tokenizer_pb2.SessionUpdate:
        """Flush text held back; the session ends."""
        return await self._send(tokenizer_pb2.SessionInput(session_id=self._id, finish=True))

    async def _send(self, inp: tokenizer_pb2.SessionInput) -> tokenizer_pb2.SessionUpdate:
        if self._stream is None:  # the first input opens the session on the current stream
            assert self._open is not None, "start() first"
            self._stream = self._owner.stream()
            inp.open.CopyFrom(self._open)
        elif self._stream.failure is not None:
            raise self._stream.failure  # the tokenizer's state of this session went with that stream
        future = self._stream.send(inp)
        if self._deadline is None:
            update = await future
        else:
            try:
                async with asyncio.timeout_at(self._deadline):
                    update = await future
            except TimeoutError:
                raise DeadlineExceeded("deadline exceeded while the tokenizer detokenized") from None
        if update.done:
            self.done = True
        if update.HasField("error"):
            raise refused(update.error)
        return update

    async def close(self) -> None:
        """Drop the session unless it ended (finish, stop match or error): the tokenizer forgets it."""
        if self._stream is not None and not self.done:
            self._stream.cancel(self._id)
