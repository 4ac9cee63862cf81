"""The sessions of one DetokenizeSessions stream: many generations' detokenization on one stream.

Pure logic over the protobuf messages, no gRPC: the service hands each request message to
`SessionTable.apply` and sends back the response it returns (one per request, in order). Each
session is a StreamDetokenizer, as on a DetokenizeStream; what a session did wrong closes that
session alone (its update carries the error), never the table or the stream.
"""

from __future__ import annotations

from collections.abc import Callable

from kvmesh.serving.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, ServiceError
from kvmesh.telemetry.tokenizer import record_tokens
from kvmesh.v1 import tokenizer_pb2
from tokenizer_svc.stream import StreamDetokenizer, StreamStep

# Opens a session from its DetokenizeStreamStart (validates it; raises ServiceError).
OpenSession = Callable[[tokenizer_pb2.DetokenizeStreamStart], StreamDetokenizer]
# Checks one input's ids (raises ServiceError).
CheckIds = Callable[[str, object], None]


class SessionTable:
    """The open sessions of one stream, by the client's session id.

    Args:
        open_session: builds a session from its start message (the service's validation included).
        check_ids: validates an input's ids against the vocabulary and the per-batch limit.
        max_sessions: most sessions open at once; an open beyond it is refused (RESOURCE_EXHAUSTED).
    """

    def __init__(self, open_session: OpenSession, check_ids: CheckIds, max_sessions: int):
        self._open = open_session
        self._check_ids = check_ids
        self._max_sessions = max_sessions
        self._sessions: dict[int, StreamDetokenizer] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def apply(self, request: tokenizer_pb2.DetokenizeSessionsRequest) -> tokenizer_pb2.DetokenizeSessionsResponse:
        """Every input of one request message, in order; one update per input, cancels excepted."""
        response = tokenizer_pb2.DetokenizeSessionsResponse()
        for inp in request.inputs:
            if inp.cancel:
                self._close(inp.session_id)
                continue
            update = response.updates.add(session_id=inp.session_id)
            try:
                self._apply_one(inp, update)
            except ServiceError as exc:
                self._close(inp.session_id)
                update.Clear()  # nothing of a refused input's work reaches the client
                update.session_id = inp.session_id
                update.done = True
                update.error.code = exc.code.value[0]
                update.error.message = exc.message
        return response

    def num_ids(self, request: tokenizer_pb2.DetokenizeSessionsRequest) -> int:
        """Ids in a request message: what decides whether to apply it off the event loop."""
        return sum(len(inp.token_ids) for inp in request.inputs)

    def _apply_one(self, inp: tokenizer_pb2.SessionInput, update: tokenizer_pb2.SessionUpdate) -> None:
        sid = inp.session_id
        if inp.HasField("open"):
            if sid in self._sessions:
                raise InvalidArgument("inputs.open", f"session {sid} is already open on this stream")
            if len(self._sessions) >= self._max_sessions:
                raise ResourceExhausted(f"{len(self._sessions)} sessions open on this stream; at most "
                                        f"{self._max_sessions} (max_sessions_per_stream)")
            session = self._open(inp.open)
            self._sessions[sid] = session
        else:
            session = self._sessions.get(sid)
            if session is None:
                raise FailedPrecondition(f"session {sid} is not open on this stream (open it first; a finished, "
                                         f"stopped or refused session takes no more input)")
        self._check_ids("inputs.token_ids", inp.token_ids)
        step = session.feed(inp.token_ids) if inp.token_ids else None
        if inp.finish and (step is None or not step.done):
            step = _joined(step, session.finish())
        if step is None:  # an open alone, or an empty batch: nothing new
            update.num_tokens = session.num_tokens
            return
        _fill(update, step)
        if step.done:
            self._close(sid)
            record_tokens("detokenize_stream", step.num_tokens)

    def _close(self, session_id: int) -> None:
        self._sessions.pop(session_id, None)

    def close_all(self) -> None:
        """The stream ended: every session on it is gone."""
        self._sessions.clear()


def _joined(fed: StreamStep | None, finished: StreamStep) -> StreamStep:
    """A feed and the finish after it, as one step."""
    if fed is None:
        return finished
    finished.text = fed.text + finished.text
    return finished


def _fill(update: tokenizer_pb2.SessionUpdate, step: StreamStep) -> None:
    update.text = step.text
    update.num_tokens = step.num_tokens
    update.done = step.done
    if step.stop is not None:
        update.stop_match.stop = step.stop
        update.stop_match.token_index = step.stop_token_index

