"""Hypothesis strategies for any protobuf request message, built from its descriptor: every field
set or left out at random, values at and beyond their limits (extreme integers, NaN and infinities,
unknown enum numbers, long and odd Unicode strings), nested messages and oneofs included."""

from __future__ import annotations

from google.protobuf import descriptor as d
from google.protobuf.message import Message
from hypothesis import strategies as st

MAX_DEPTH = 3
MAX_REPEATED = 6


def _ints(bits: int, signed: bool) -> st.SearchStrategy[int]:
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    edges = [v for v in (0, 1, 2, 3, 16, 255, 256, 511, 512, 513, 4096, hi, lo, -1) if lo <= v <= hi]
    return st.one_of(st.sampled_from(edges), st.integers(0, 600) if hi >= 600 else st.integers(lo, hi),
                     st.integers(lo, hi))


_TEXT = st.one_of(st.text(max_size=40), st.sampled_from(["", " ", "\x00", "\ud7ff\ue000", "Once upon a time",
                                                         "{{ raise_exception('x') }}", "<s>", "é" * 300]))
_SCALARS = {
    d.FieldDescriptor.TYPE_INT32: _ints(32, True), d.FieldDescriptor.TYPE_SINT32: _ints(32, True),
    d.FieldDescriptor.TYPE_SFIXED32: _ints(32, True), d.FieldDescriptor.TYPE_INT64: _ints(64, True),
    d.FieldDescriptor.TYPE_SINT64: _ints(64, True), d.FieldDescriptor.TYPE_SFIXED64: _ints(64, True),
    d.FieldDescriptor.TYPE_UINT32: _ints(32, False), d.FieldDescriptor.TYPE_FIXED32: _ints(32, False),
    d.FieldDescriptor.TYPE_UINT64: _ints(64, False), d.FieldDescriptor.TYPE_FIXED64: _ints(64, False),
    d.FieldDescriptor.TYPE_BOOL: st.booleans(),
    d.FieldDescriptor.TYPE_FLOAT: st.one_of(st.sampled_from([0.0, -0.0, 1.0, 1e-38, 1e38, -1.0, 100.0, 101.0]),
                                            st.floats(width=32)),
    d.FieldDescriptor.TYPE_DOUBLE: st.one_of(st.sampled_from([0.0, 1.0, -1.0, 1e300]), st.floats()),
    d.FieldDescriptor.TYPE_STRING: _TEXT,
    d.FieldDescriptor.TYPE_BYTES: st.binary(max_size=40),
}


def _is_map(field: d.FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _value(field: d.FieldDescriptor, depth: int) -> st.SearchStrategy:
    if field.type == d.FieldDescriptor.TYPE_MESSAGE:
        return messages(field.message_type._concrete_class, depth + 1)
    if field.type == d.FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-5, 1000))
    return _SCALARS[field.type]


@st.composite
def _message(draw, cls: type[Message], depth: int) -> Message:
    msg = cls()
    for field in cls.DESCRIPTOR.fields:
        if depth >= MAX_DEPTH and field.type == d.FieldDescriptor.TYPE_MESSAGE:
            continue
        if not draw(st.booleans()):
            continue
        if _is_map(field):
            key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            entries = draw(st.dictionaries(_value(key, depth), _value(value, depth), max_size=MAX_REPEATED))
            container = getattr(msg, field.name)
            for k, v in entries.items():
                if value.type == d.FieldDescriptor.TYPE_MESSAGE:
                    container[k].CopyFrom(v)
                else:
                    container[k] = v
            continue
        if field.is_repeated:
            values = draw(st.lists(_value(field, depth), max_size=MAX_REPEATED))
            container = getattr(msg, field.name)
            if field.type == d.FieldDescriptor.TYPE_MESSAGE:
                for v in values:
                    container.add().CopyFrom(v)
            else:
                container.extend(values)
        elif field.type == d.FieldDescriptor.TYPE_MESSAGE:
            getattr(msg, field.name).CopyFrom(draw(_value(field, depth)))
        else:
            setattr(msg, field.name, draw(_value(field, depth)))  # a later oneof member replaces an earlier one
    return msg


def messages(cls: type[Message], depth: int = 0) -> st.SearchStrategy[Message]:
    """Random instances of `cls` (a generated protobuf message class)."""
    return _message(cls, depth)


@st.composite
def mutations(draw, seed: Message) -> Message:
    """`seed` (a valid request) with a few fields replaced by random values: gets past the first
    checks, into the deeper paths (scheduling, streaming, stop strings, cancellation)."""
    noise = draw(messages(type(seed)))
    msg = type(seed)()
    msg.CopyFrom(seed)
    for field in seed.DESCRIPTOR.fields:
        if draw(st.integers(0, 4)) == 0:  # about one field in five
            msg.ClearField(field.name)
            if _is_map(field):
                getattr(msg, field.name).MergeFrom(getattr(noise, field.name))
            elif field.is_repeated:
                getattr(msg, field.name).extend(getattr(noise, field.name))
            elif field.type == d.FieldDescriptor.TYPE_MESSAGE:
                if noise.HasField(field.name):
                    getattr(msg, field.name).CopyFrom(getattr(noise, field.name))
            elif field.containing_oneof is None or noise.HasField(field.name):
                setattr(msg, field.name, getattr(noise, field.name))
    return msg


def requests(cls: type[Message], seeds: list[Message] = ()) -> st.SearchStrategy[bytes]:
    """What a client may put on the wire: a valid request with a few fields mutated, a random
    message, either truncated, or random bytes (garbage)."""
    choices = [messages(cls)]
    if seeds:
        choices += [st.sampled_from(seeds).flatmap(mutations)] * 3
    encoded = st.one_of(*choices).map(lambda m: m.SerializeToString())
    truncated = encoded.flatmap(lambda b: st.integers(0, max(len(b) - 1, 0)).map(lambda n: b[:n]))
    return st.one_of(encoded, encoded, encoded, encoded, truncated, st.binary(max_size=200))
