"""The tokenizer service's request limits and the checks that enforce them.

Each check raises InvalidArgument naming the field, the value and the limit (DESIGN.md section 7).
Messages beyond --max-message-bytes never reach these checks: gRPC answers RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvmesh.serving.errors import InvalidArgument


@dataclass(frozen=True, slots=True)
class TokenizerLimits:
    """Per-request limits, set by flags and reported by GetInfo."""

    max_text_bytes: int = 4 * 1024 * 1024  # Tokenize text, UTF-8 bytes
    max_ids_per_request: int = 1 << 20  # Detokenize ids, stream prompt ids, one stream batch
    max_stop_strings: int = 16
    max_stop_string_bytes: int = 256
    max_sessions_per_stream: int = 16384  # DetokenizeSessions: sessions open at once on one stream

    def __post_init__(self):
        for name in ("max_text_bytes", "max_ids_per_request", "max_stop_strings", "max_stop_string_bytes",
                     "max_sessions_per_stream"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


def check_text(field: str, text: str, limits: TokenizerLimits) -> None:
    if not text:
        raise InvalidArgument(field, "must not be empty")
    # Cheap bound first: a str of n characters has between n and 4n UTF-8 bytes.
    if len(text) > limits.max_text_bytes or (4 * len(text) > limits.max_text_bytes
                                              and len(text.encode()) > limits.max_text_bytes):
        raise InvalidArgument(field, f"{len(text.encode())} bytes exceeds the limit of "
                                     f"{limits.max_text_bytes} bytes (max_text_bytes)")


def check_ids(field: str, ids: Sequence[int], vocab_size: int, limits: TokenizerLimits, *, allow_empty: bool) -> None:
    if not ids and not allow_empty:
        raise InvalidArgument(field, "must not be empty")
    if len(ids) > limits.max_ids_per_request:
        raise InvalidArgument(field, f"{len(ids)} ids exceeds the limit of {limits.max_ids_per_request} "
                                     f"(max_ids_per_request)")
    # max() over a protobuf repeated field runs in C; find the offending index only on failure.
    if ids and max(ids) >= vocab_size:
        index = next(i for i, t in enumerate(ids) if t >= vocab_size)
        raise InvalidArgument(f"{field}[{index}]", f"id {ids[index]} is outside the vocabulary "
                                                   f"[0, {vocab_size})")


def check_stops(field: str, stops: Sequence[str], limits: TokenizerLimits) -> None:
    if len(stops) > limits.max_stop_strings:
        raise InvalidArgument(field, f"{len(stops)} stop strings exceeds the limit of {limits.max_stop_strings} "
                                     f"(max_stop_strings)")
    for i, stop in enumerate(stops):
        if not stop:
            raise InvalidArgument(f"{field}[{i}]", "stop strings must not be empty")
        size = len(stop.encode())
        if size > limits.max_stop_string_bytes:
            raise InvalidArgument(f"{field}[{i}]", f"{size} bytes exceeds the limit of "
                                                   f"{limits.max_stop_string_bytes} bytes (max_stop_string_bytes)")
