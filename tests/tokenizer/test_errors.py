"""Bad input gets INVALID_ARGUMENT naming the field and the limit (RESOURCE_EXHAUSTED for an
oversized message), never INTERNAL or UNKNOWN, and the service keeps serving after each."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from kvmesh.v1 import common_pb2, tokenizer_pb2 as pb
from tok_support import TEST_LIMITS, TEST_MAX_MESSAGE_BYTES

OK = pb.TokenizeRequest(text="still serving")


async def expect_error(stub, coro, code, *needles, field=None):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await coro
    assert err.value.code() == code, err.value.details()
    for needle in needles:
        assert needle in err.value.details()
    if field is not None:
        bad = error_details_pb2.BadRequest()
        assert rpc_status.from_call(err.value).details[0].Unpack(bad)
        assert bad.field_violations[0].field == field
    assert (await stub.Tokenize(OK)).token_ids  # and the service still answers


async def test_empty_requests(stub):
    code = grpc.StatusCode.INVALID_ARGUMENT
    # Empty text is valid (as vLLM takes it): it encodes to the special tokens alone, BOS for Llama.
    info = await stub.GetInfo(common_pb2.GetInfoRequest())
    assert list((await stub.Tokenize(pb.TokenizeRequest())).token_ids) == [info.bos_token_id]
    assert list((await stub.Tokenize(pb.TokenizeRequest(add_special_tokens=False))).token_ids) == []
    await expect_error(stub, stub.Detokenize(pb.DetokenizeRequest()), code, "token_ids: must not be empty",
                       field="token_ids")


async def test_text_over_the_limit_names_it(stub):
    text = "é" * (TEST_LIMITS.max_text_bytes // 2 + 1)  # under the limit in characters, over in bytes
    await expect_error(stub, stub.Tokenize(pb.TokenizeRequest(text=text)), grpc.StatusCode.INVALID_ARGUMENT,
                       f"{len(text.encode())} bytes", f"limit of {TEST_LIMITS.max_text_bytes} bytes",
                       "max_text_bytes", field="text")
    at_limit = "a" * TEST_LIMITS.max_text_bytes
    assert (await stub.Tokenize(pb.TokenizeRequest(text=at_limit))).token_ids


async def test_oversized_message_is_resource_exhausted(stub):
    text = "a" * (TEST_MAX_MESSAGE_BYTES + 1)
    await expect_error(stub, stub.Tokenize(pb.TokenizeRequest(text=text)), grpc.StatusCode.RESOURCE_EXHAUSTED)


async def test_ids_outside_the_vocabulary_and_too_many(stub):
    code = grpc.StatusCode.INVALID_ARGUMENT
    await expect_error(stub, stub.Detokenize(pb.DetokenizeRequest(token_ids=[5, 512])), code,
                       "id 512 is outside the vocabulary [0, 512)", field="token_ids[1]")
    too_many = [5] * (TEST_LIMITS.max_ids_per_request + 1)
    await expect_error(stub, stub.Detokenize(pb.DetokenizeRequest(token_ids=too_many)), code,
                       f"limit of {TEST_LIMITS.max_ids_per_request}", "max_ids_per_request", field="token_ids")


async def stream_error(stub, messages):
    """Send messages on one DetokenizeStream; return the status error it ends with."""
    call = stub.DetokenizeStream()
    for message in messages:
        await call.write(message)
    await call.done_writing()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        while await call.read() is not grpc.aio.EOF:
            pass
    return err.value


def start(**kwargs):
    return pb.DetokenizeStreamRequest(start=pb.DetokenizeStreamStart(**kwargs))


def tokens(ids):
    return pb.DetokenizeStreamRequest(tokens=common_pb2.TokenIds(ids=ids))


@pytest.mark.parametrize("messages, needles", [
    ([start(stop=["a", "b", "c", "d", "e"])], ["start.stop", "5 stop strings", "limit of 4", "max_stop_strings"]),
    ([start(stop=["x" * 17])], ["start.stop[0]", "17 bytes", "limit of 16 bytes", "max_stop_string_bytes"]),
    ([start(stop=["ok", ""])], ["start.stop[1]", "must not be empty"]),
    ([start(prompt_token_ids=[1, 600])], ["start.prompt_token_ids[1]", "id 600 is outside the vocabulary"]),
    ([start(), tokens([3, 4, 9999])], ["tokens.ids[2]", "id 9999 is outside the vocabulary [0, 512)"]),
    ([start(), tokens([3] * 1001)], ["tokens.ids", "limit of 1000", "max_ids_per_request"]),
    ([tokens([3])], ["start: the first message must be start, got tokens"]),
    ([start(), start()], ["start: sent twice"]),
    ([start(), pb.DetokenizeStreamRequest()], ["kind: set one of start, tokens or finish"]),
])
async def test_bad_streams(stub, messages, needles):
    err = await stream_error(stub, messages)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    for needle in needles:
        assert needle in err.details()
    assert (await stub.Tokenize(OK)).token_ids


def _string_field(number: int, payload: bytes) -> bytes:
    """One length-delimited field, encoded by hand (protobuf refuses to build invalid UTF-8)."""
    assert len(payload) < 128
    return bytes([number << 3 | 2, len(payload)]) + payload


async def test_invalid_utf8_from_a_raw_channel(channel, stub):
    raw = dict(request_serializer=lambda b: b, response_deserializer=lambda b: b)
    tokenize = channel.unary_unary("/kvmesh.v1.Tokenizer/Tokenize", **raw)
    code = grpc.StatusCode.INVALID_ARGUMENT
    await expect_error(stub, tokenize(_string_field(1, b"ok \xff\xfe")), code,
                       "text: string field is not valid UTF-8", field="text")
    # Nested and repeated: the second message's content, behind a valid first message.
    chat = channel.unary_unary("/kvmesh.v1.Tokenizer/ApplyChatTemplate", **raw)
    good = _string_field(1, b"user") + _string_field(2, b"hi")
    bad = _string_field(1, b"user") + _string_field(2, b"\xc3\x28")
    await expect_error(stub, chat(_string_field(1, good) + _string_field(1, bad)), code,
                       "messages[1].content: string field is not valid UTF-8", field="messages[1].content")
    # On a stream, in a message after the start.
    stream = channel.stream_stream("/kvmesh.v1.Tokenizer/DetokenizeStream", **raw)
    call = stream()
    await call.write(start().SerializeToString())
    await call.write(_string_field(1, _string_field(2, b"\xed\xa0\x80")))  # a UTF-8-encoded surrogate
    await call.done_writing()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    assert err.value.code() == code and "start.stop[0]: string field is not valid UTF-8" in err.value.details()
    assert (await stub.Tokenize(OK)).token_ids


async def test_garbage_bytes_are_invalid_argument(channel, stub):
    tokenize = channel.unary_unary("/kvmesh.v1.Tokenizer/Tokenize", request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
    await expect_error(stub, tokenize(b"\x0a\xff\xff\xff"), grpc.StatusCode.INVALID_ARGUMENT,
                       "request: could not be parsed")
