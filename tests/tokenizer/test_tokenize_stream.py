"""TokenizeStream over real gRPC on a loopback port (stories260k tokenizer), and the router's
TokenizerClient on it. Oracle: unary Tokenize on the same server."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2

from kvmesh.serving.errors import ServiceError
from kvmesh.v1 import router_pb2, tokenizer_pb2 as pb
from router.tokenizer_client import TokenizerClient
from tok_support import TEST_LIMITS
from tokenizer_svc.service import INLINE_TEXT_CHARS

TEXTS = ["Once upon a time", "Ben saw a 🐸 in the pond.", "", "tabs\tand\nnewlines ", "Lily " * 30]


async def test_items_of_one_message_answered_together_as_tokenize_answers_them(stub):
    expected = [list((await stub.Tokenize(pb.TokenizeRequest(text=t))).token_ids) for t in TEXTS]
    call = stub.TokenizeStream()
    await call.write(pb.TokenizeStreamRequest(items=[pb.TokenizeItem(item_id=10 + i, request=pb.TokenizeRequest(text=t))
                                                     for i, t in enumerate(TEXTS)]))
    reply = await call.read()  # short texts are encoded inline: one answer for the whole message
    assert [(r.item_id, list(r.token_ids), r.error_code) for r in reply.results] == \
        [(10 + i, ids, 0) for i, ids in enumerate(expected)]
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK


async def test_a_refused_item_gets_its_status_and_a_long_text_its_ids(stub):
    long_text = "The dog ran. " * (INLINE_TEXT_CHARS // 13 + 10)  # encoded off the event loop
    assert len(long_text.encode()) <= TEST_LIMITS.max_text_bytes
    too_long = "x" * (TEST_LIMITS.max_text_bytes + 1)
    expected = list((await stub.Tokenize(pb.TokenizeRequest(text=long_text))).token_ids)
    call = stub.TokenizeStream()
    await call.write(pb.TokenizeStreamRequest(items=[
        pb.TokenizeItem(item_id=1, request=pb.TokenizeRequest(text=long_text)),
        pb.TokenizeItem(item_id=2, request=pb.TokenizeRequest(text=too_long)),
        pb.TokenizeItem(item_id=3, request=pb.TokenizeRequest(text="hi"))]))
    results = {}
    while len(results) < 3:
        results.update((r.item_id, r) for r in (await call.read()).results)
    assert list(results[1].token_ids) == expected and results[1].error_code == 0
    assert results[2].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and not results[2].token_ids
    assert results[2].error_message.startswith("text: ")
    violation = error_details_pb2.BadRequest()
    assert results[2].error_details[0].Unpack(violation) and violation.field_violations[0].field == "text"
    assert results[3].error_code == 0 and results[3].token_ids[0] == 1
    call.cancel()


async def test_router_tokenizes_on_the_shared_stream(channel, stub):
    client = TokenizerClient(channel)
    client.use_tokenize_stream()
    try:
        for text in TEXTS:
            ids = await client.prompt_ids(router_pb2.RouterGenerateRequest(text=text), timeout=5.0)
            assert ids == list((await stub.Tokenize(pb.TokenizeRequest(text=text))).token_ids)
        stream = client.tokenize_stream.get()
        try:
            await client.prompt_ids(router_pb2.RouterGenerateRequest(text="x" * 5000), timeout=5.0)
            raise AssertionError("a text over the limit was tokenized")
        except ServiceError as err:  # the caller's error, passed through with its details
            assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.message.startswith("text: ")
            assert err.details and err.details[0].Is(error_details_pb2.BadRequest.DESCRIPTOR)
        assert client.tokenize_stream.get() is stream  # a refused text leaves the stream up
    finally:
        await client.close()
