"""DetokenizeSessions on a real tokenizer server: many sessions on one stream, each answering as a
DetokenizeStream of its own would (the oracle: the tokenizer's one-shot Detokenize, and the
per-request stream), and errors that close one session and leave the stream and the rest alone."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from kvmesh.v1 import common_pb2
from kvmesh.v1 import tokenizer_pb2 as pb
from tok_support import TEST_LIMITS
from tokenizer_svc.limits import TokenizerLimits
from tokenizer_svc.server import serve_tokenizer

STORIES = [f"Story {i}: Lily saw {i} 🐸 by the pond, and Tom said \"wow, héllo 中文\" {'!' * i}" for i in range(12)]


class Sessions:
    """One DetokenizeSessions stream driven in lockstep: one request message, its one response."""

    def __init__(self, stub):
        self.call = stub.DetokenizeSessions()

    async def send(self, *inputs: pb.SessionInput) -> list[pb.SessionUpdate]:
        await self.call.write(pb.DetokenizeSessionsRequest(inputs=inputs))
        reply = await self.call.read()
        assert reply is not grpc.aio.EOF
        return list(reply.updates)

    async def end(self) -> None:
        await self.call.done_writing()
        assert await self.call.read() is grpc.aio.EOF


def opened(sid, prompt=(), stop=(), **start) -> pb.SessionInput:
    return pb.SessionInput(session_id=sid, open=pb.DetokenizeStreamStart(prompt_token_ids=prompt, stop=stop, **start))


def ids_of(stories_tok, text):
    return stories_tok.text_tokenizer.encode(text, add_special_tokens=False).ids


async def test_many_sessions_one_id_each_per_message_equal_detokenize(stub, stories_tok):
    """Every message carries the next id of every unfinished session (ids of multi-byte characters
    split across messages): each session's text is the one-shot decode, no delta holds U+FFFD."""
    s = Sessions(stub)
    ids = {sid: ids_of(stories_tok, text) for sid, text in enumerate(STORIES, start=1)}
    texts = {sid: "" for sid in ids}
    assert await s.send(*(opened(sid, prompt=[1]) for sid in ids)) == [
        pb.SessionUpdate(session_id=sid) for sid in ids]
    for step in range(max(map(len, ids.values()))):
        live = [sid for sid in ids if step < len(ids[sid])]
        updates = await s.send(*(pb.SessionInput(session_id=sid, token_ids=[ids[sid][step]]) for sid in live))
        assert [u.session_id for u in updates] == live  # one update per input, in order
        for u in updates:
            assert "\ufffd" not in u.text and u.num_tokens == step + 1 and not u.done
            texts[u.session_id] += u.text
    finals = await s.send(*(pb.SessionInput(session_id=sid, finish=True) for sid in ids))
    assert all(u.done for u in finals)
    for u in finals:
        texts[u.session_id] += u.text
    assert [texts[sid] for sid in ids] == STORIES
    await s.end()


async def test_bad_input_closes_its_session_alone(stub, stories_tok):
    s = Sessions(stub)
    good = ids_of(stories_tok, "Once upon a time")
    updates = await s.send(opened(1), opened(2), opened(3, stop=["x" * 40]),
                           pb.SessionInput(session_id=4, token_ids=[5]))
    assert [(u.session_id, u.done, u.HasField("error")) for u in updates] == [
        (1, False, False), (2, False, False), (3, True, True), (4, True, True)]
    assert updates[2].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "open.stop[0]" in updates[2].error.message or "stop[0]" in updates[2].error.message
    assert updates[3].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "session 4 is not open" in updates[3].error.message

    vocab = (await stub.GetInfo(common_pb2.GetInfoRequest())).vocab_size
    updates = await s.send(pb.SessionInput(session_id=1, token_ids=good[:2]),
                           pb.SessionInput(session_id=2, token_ids=[good[0], vocab + 7]))
    assert not updates[0].HasField("error") and updates[0].num_tokens == 2
    bad = updates[1]
    assert bad.done and bad.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and not bad.text
    assert f"inputs.token_ids[1]: id {vocab + 7} is outside the vocabulary [0, {vocab})" in bad.error.message
    # Session 2 is closed for good; session 1 goes on as if nothing happened.
    updates = await s.send(pb.SessionInput(session_id=2, token_ids=good[:1]),
                           pb.SessionInput(session_id=1, token_ids=good[2:], finish=True))
    assert updates[0].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert updates[1].done and not updates[1].HasField("error")
    # An open of an id that is live on this stream is refused (the live session is not touched).
    updates = await s.send(opened(9), opened(9))
    assert not updates[0].HasField("error") and updates[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "session 9 is already open" in updates[1].error.message
    await s.end()


async def test_stop_strings_are_per_session_within_one_message(stub, stories_tok):
    """Two sessions share every message; one stop string completes across two messages in one
    session, the other session (no stop, then its own stop) is not affected by it."""
    text = "One day, a little girl named Lily went to the park."
    ids = ids_of(stories_tok, text)
    split = next(i for i in range(1, len(ids)) if stories_tok.text_tokenizer.decode(ids[:i]).endswith("girl"))
    s = Sessions(stub)
    await s.send(opened(1, stop=["girl named"]), opened(2), opened(3, stop=["park"], include_stop_string=True))
    first = await s.send(*(pb.SessionInput(session_id=sid, token_ids=ids[:split]) for sid in (1, 2, 3)))
    assert first[0].text == "One day, a little " and first[1].text == stories_tok.text_tokenizer.decode(ids[:split])
    second = await s.send(*(pb.SessionInput(session_id=sid, token_ids=ids[split:]) for sid in (1, 2, 3)))
    one, two, three = second
    assert one.done and one.stop_match.stop == "girl named" and one.text == ""
    assert one.stop_match.token_index == split and one.num_tokens == len(ids)
    assert not two.done and first[1].text + two.text == text
    assert three.done and three.stop_match.stop == "park" and first[2].text + three.text == text[:text.index("park") + 4]
    # Sessions 1 and 3 are closed: their ids take no more input; session 2 still finishes.
    after = await s.send(pb.SessionInput(session_id=1, token_ids=[5]), pb.SessionInput(session_id=2, finish=True))
    assert after[0].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert after[1].done and after[1].text == ""
    await s.end()


async def test_session_equals_its_own_detokenize_stream(stub, stories_tok):
    """Open, all ids and finish in one input: the same text as the per-request stream's, for a
    prompt whose first generated token needs its leading space and an emoji split in bytes."""
    prompt = stories_tok.text_tokenizer.encode("Once upon").ids
    generated = stories_tok.text_tokenizer.encode("Once upon a time 😀 end").ids[len(prompt):]
    (update,) = await Sessions(stub).send(pb.SessionInput(
        session_id=7, open=pb.DetokenizeStreamStart(prompt_token_ids=prompt), token_ids=generated, finish=True))
    assert update.done and update.text == " a time 😀 end" and update.num_tokens == len(generated)


async def test_cancel_drops_a_session_and_gets_no_update(stub, stories_tok):
    s = Sessions(stub)
    await s.send(opened(1), opened(2))
    updates = await s.send(pb.SessionInput(session_id=1, cancel=True), pb.SessionInput(session_id=2, token_ids=[300]),
                           pb.SessionInput(session_id=5, cancel=True))  # unknown: ignored
    assert [u.session_id for u in updates] == [2]
    assert (await s.send(pb.SessionInput(session_id=1, finish=True)))[0].error.code == \
        grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert await s.send(pb.SessionInput(session_id=2, cancel=True)) == []  # a message of cancels is answered empty
    await s.end()


async def test_sessions_per_stream_limit_is_per_stream(stories_tok):
    limits = TokenizerLimits(**{**{f: getattr(TEST_LIMITS, f) for f in TEST_LIMITS.__dataclass_fields__},
                                "max_sessions_per_stream": 2})
    running, executor = await serve_tokenizer(stories_tok, limits, port=0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            from kvmesh.v1 import tokenizer_pb2_grpc
            stub = tokenizer_pb2_grpc.TokenizerStub(channel)
            assert (await stub.GetInfo(common_pb2.GetInfoRequest())).max_sessions_per_stream == 2
            a, b = Sessions(stub), Sessions(stub)
            updates = await a.send(opened(1), opened(2), opened(3))
            assert updates[2].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            assert "2 sessions open on this stream; at most 2 (max_sessions_per_stream)" in updates[2].error.message
            assert not (await b.send(opened(3)))[0].HasField("error")  # another stream has its own table
            await a.send(pb.SessionInput(session_id=1, finish=True))
            assert not (await a.send(opened(3)))[0].HasField("error")  # a closed session frees its place
    finally:
        await running.stop(0)
        executor.shutdown()


async def test_large_message_goes_through_the_thread_pool(stub, stories_tok):
    from tokenizer_svc.service import INLINE_SESSION_IDS
    text = "Lily and Tom went to the park. They saw a big 🐸 and said \"héllo\"! " * 8
    ids = ids_of(stories_tok, text)
    n = INLINE_SESSION_IDS // len(ids) + 2  # together more ids than are applied on the event loop
    updates = await Sessions(stub).send(*(pb.SessionInput(session_id=sid, open=pb.DetokenizeStreamStart(),
                                                          token_ids=ids, finish=True) for sid in range(n)))
    assert sum(len(ids) for _ in range(n)) > INLINE_SESSION_IDS
    assert [u.text for u in updates] == [text] * n


async def test_concurrent_streams_do_not_share_sessions(stub, stories_tok):
    ids = ids_of(stories_tok, "the cat sat")

    async def run(stream_no):
        s = Sessions(stub)
        await s.send(opened(1, stop=["cat"] if stream_no % 2 else ()))
        (u,) = await s.send(pb.SessionInput(session_id=1, token_ids=ids, finish=True))
        await s.end()
        return u.text

    assert await asyncio.gather(*(run(i) for i in range(6))) == ["the cat sat", "the "] * 3


async def test_a_cancelled_stream_leaves_the_service_serving(stub, stories_tok):
    s = Sessions(stub)
    await s.send(opened(1))
    await s.call.write(pb.DetokenizeSessionsRequest(inputs=[pb.SessionInput(session_id=1, token_ids=[300])]))
    s.call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await s.call.read()
    (u,) = await Sessions(stub).send(pb.SessionInput(session_id=1, open=pb.DetokenizeStreamStart(),
                                                     token_ids=[300], finish=True))
    assert u.done and not u.HasField("error")
