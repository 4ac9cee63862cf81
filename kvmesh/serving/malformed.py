"""Requests whose bytes do not parse (such as invalid UTF-8 in a proto3 string field).

grpc parses a request before any servicer code runs; a DecodeError there becomes UNKNOWN with the
exception text. The interceptor instead wraps each method's deserializer with `tolerant`, which
returns a Malformed marker, and turns the marker into INVALID_ARGUMENT naming the bad field
(found by walking the wire format against the message descriptor).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError


@dataclass(frozen=True)
class Malformed:
    """Stands in for a request that did not parse."""

    field: str  # the offending field path ("messages[0].content"), or "request" when unknown
    reason: str


def tolerant(deserializer: Callable | None) -> Callable | None:
    """Wrap a request deserializer so that a parse failure yields Malformed instead of raising."""
    if deserializer is None:
        return None
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except DecodeError:
            path = _bad_utf8_field(descriptor, data, "") if isinstance(descriptor, Descriptor) else None
            if path is not None:
                return Malformed(path, "string field is not valid UTF-8")
            return Malformed("request", "could not be parsed as a protobuf message")
    return deserialize


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise IndexError("truncated varint")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7


def _bad_utf8_field(descriptor: Descriptor, data: bytes, prefix: str) -> str | None:
    """Path of the first string field with invalid UTF-8 in `data`, or None (not found, or bytes
    malformed in another way)."""
    counts: dict[int, int] = {}
    pos = 0
    try:
        while pos < len(data):
            tag, pos = _varint(data, pos)
            number, wire_type = tag >> 3, tag & 7
            if wire_type == 0:
                _, pos = _varint(data, pos)
                continue
            if wire_type in (1, 5):
                pos += 8 if wire_type == 1 else 4
                continue
            if wire_type != 2:
                return None
            size, pos = _varint(data, pos)
            payload, pos = data[pos:pos + size], pos + size
            field = descriptor.fields_by_number.get(number)
            if field is None:
                continue
            index = counts.get(number, 0)
            counts[number] = index + 1
            name = f"{prefix}{field.name}" + (f"[{index}]" if _is_repeated(field) else "")
            if field.type == FieldDescriptor.TYPE_STRING:
                try:
                    payload.decode("utf-8")
                except UnicodeDecodeError:
                    return name
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                found = _bad_utf8_field(field.message_type, payload, name + ".")
                if found is not None:
                    return found
    except IndexError:
        return None
    return None


def _is_repeated(field: FieldDescriptor) -> bool:
    # protobuf >= 5 has `is_repeated`; `label` is deprecated there.
    repeated = getattr(field, "is_repeated", None)
    return repeated if repeated is not None else field.label == FieldDescriptor.LABEL_REPEATED
