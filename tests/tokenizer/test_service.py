"""The tokenizer service over real gRPC on a loopback port, through the generated stubs, with the
stories260k tokenizer. Oracles: greedy_examples.json's prompt_ids, one-shot `tokenizers` decodes,
and transformers' own apply_chat_template."""

from __future__ import annotations

import asyncio
import json
import shutil

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings

from kvmesh.v1 import SCHEMA_REVISION, common_pb2, tokenizer_pb2 as pb
from tok_support import TEST_LIMITS, texts
from tokenizer_svc.limits import TokenizerLimits
from tokenizer_svc.loader import load_tokenizer
from tokenizer_svc.server import serve_tokenizer


async def test_health_is_serving(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "kvmesh.v1.Tokenizer"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_tokenize_equals_greedy_examples_prompt_ids(stub, stories260k_dir):
    examples = json.loads((stories260k_dir / "greedy_examples.json").read_text())["examples"]
    for example in examples:
        reply = await stub.Tokenize(pb.TokenizeRequest(text=example["prompt"]))
        assert list(reply.token_ids) == example["prompt_ids"]


@pytest.mark.parametrize("text", ["The dog ran", "  two leading spaces", "tabs\tand\nnewlines ",
                                  "Ben saw a 🐸 in the pond.", "Grüße, 東京! €5 👍🏽 e\u0301"])
async def test_detokenize_of_tokenize_is_identity(stub, text):
    ids = (await stub.Tokenize(pb.TokenizeRequest(text=text))).token_ids
    assert (await stub.Detokenize(pb.DetokenizeRequest(token_ids=ids))).text == text


async def test_special_token_text_is_plain_text_unless_asked(stub):
    reply = await stub.Tokenize(pb.TokenizeRequest(text="<s> hi </s>"))
    assert reply.token_ids[0] == 1 and 1 not in reply.token_ids[1:] and 2 not in reply.token_ids
    assert (await stub.Detokenize(pb.DetokenizeRequest(token_ids=reply.token_ids))).text == "<s> hi </s>"
    parsed = await stub.Tokenize(pb.TokenizeRequest(text="<s> hi </s>", parse_special_tokens=True))
    assert list(parsed.token_ids[:2]) == [1, 1] and parsed.token_ids[-1] == 2
    bare = await stub.Tokenize(pb.TokenizeRequest(text="hi", add_special_tokens=False))
    assert 1 not in bare.token_ids


async def test_detokenize_skip_special_tokens(stub):
    ids = list((await stub.Tokenize(pb.TokenizeRequest(text="hi"))).token_ids) + [2]
    assert (await stub.Detokenize(pb.DetokenizeRequest(token_ids=ids))).text == "hi"
    shown = await stub.Detokenize(pb.DetokenizeRequest(token_ids=ids, skip_special_tokens=False))
    assert shown.text == "<s> hi</s>"


async def test_get_info(stub):
    info = await stub.GetInfo(common_pb2.GetInfoRequest())
    assert info.vocab_size == 512 and info.bos_token_id == 1 and info.max_length == 512
    # generation_config.json lists [2, 1]: BOS ends a TinyStories story.
    assert sorted(info.eos_token_ids) == [1, 2]
    assert not info.HasField("pad_token_id") and not info.has_chat_template
    assert (info.max_text_bytes, info.max_ids_per_request, info.max_stop_strings, info.max_stop_string_bytes) == (
        TEST_LIMITS.max_text_bytes, TEST_LIMITS.max_ids_per_request, TEST_LIMITS.max_stop_strings,
        TEST_LIMITS.max_stop_string_bytes)
    assert info.service.name == "kvmesh-tokenizer" and info.service.schema_revision == SCHEMA_REVISION
    assert info.service.model == "stories260k" and info.service.max_model_len == 512
    assert "chat_template" not in info.service.capabilities


async def detokenize_stream(stub, batches, *, prompt=(), stop=(), include=None, skip=None, finish=True):
    """Run one DetokenizeStream; return the responses (one per batch, plus the finish answer)."""
    start = pb.DetokenizeStreamStart(prompt_token_ids=prompt, stop=stop)
    if include is not None:
        start.include_stop_string = include
    if skip is not None:
        start.skip_special_tokens = skip
    call = stub.DetokenizeStream()
    await call.write(pb.DetokenizeStreamRequest(start=start))
    replies = []
    for batch in batches:
        await call.write(pb.DetokenizeStreamRequest(tokens=common_pb2.TokenIds(ids=batch)))
        reply = await call.read()
        replies.append(reply)
        if reply.done:
            break
    else:
        if finish:
            await call.write(pb.DetokenizeStreamRequest(finish=True))
            replies.append(await call.read())
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF  # nothing after the last answer, ever
    return replies


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts)
async def test_stream_one_id_at_a_time_equals_detokenize(stub, stories_tok, text):
    ids = stories_tok.text_tokenizer.encode(text).ids
    replies = await detokenize_stream(stub, [[i] for i in ids])
    assert len(replies) == len(ids) + 1 and replies[-1].done
    assert [r.num_tokens for r in replies[:-1]] == list(range(1, len(ids) + 1))
    whole = (await stub.Detokenize(pb.DetokenizeRequest(token_ids=ids))).text
    assert "".join(r.text for r in replies) == whole == text


async def test_stream_prompt_gives_the_first_token_its_space(stub, stories_tok):
    encode = stories_tok.text_tokenizer.encode
    prompt = encode("Once upon").ids
    generated = encode("Once upon a time").ids[len(prompt):]
    replies = await detokenize_stream(stub, [generated], prompt=prompt)
    assert "".join(r.text for r in replies) == " a time"


async def test_stream_stop_spanning_tokens_excluded_and_included(stub, stories_tok):
    ids = stories_tok.text_tokenizer.encode("One day, a little girl named Lily went to the park.",
                                            add_special_tokens=False).ids
    for include, shown in ((False, "One day, a little "), (True, "One day, a little girl named")):
        replies = await detokenize_stream(stub, [[i] for i in ids], stop=["girl named"], include=include)
        last = replies[-1]
        assert last.done and last.stop_match.stop == "girl named"
        assert stories_tok.text_tokenizer.decode(ids[:last.stop_match.token_index + 1]).endswith("named")
        assert stories_tok.text_tokenizer.decode(ids[:last.stop_match.token_index]).find("girl named") < 0
        assert "".join(r.text for r in replies) == shown
        # The match completed a few tokens in; nothing was answered for the tokens after it.
        assert last.num_tokens == last.stop_match.token_index + 1 < len(ids)


async def test_stream_stop_at_the_very_start_and_in_a_batch(stub, stories_tok):
    ids = stories_tok.text_tokenizer.encode("Once upon a time", add_special_tokens=False).ids
    replies = await detokenize_stream(stub, [ids], prompt=[1], stop=["Once"])
    assert len(replies) == 1 and replies[0].text == "" and replies[0].stop_match.token_index == 0
    assert replies[0].num_tokens == len(ids)  # the whole batch was received, the rest ignored


async def test_stream_overlapping_stop_candidates(stub, stories_tok):
    ids = stories_tok.text_tokenizer.encode("the cat sat", add_special_tokens=False).ids
    replies = await detokenize_stream(stub, [[i] for i in ids], stop=["cat sat", "at s", "the dog"])
    assert replies[-1].stop_match.stop == "at s" and "".join(r.text for r in replies) == "the c"


async def test_stream_skip_special_tokens_off_and_emoji_held(stub, stories_tok):
    ids = stories_tok.text_tokenizer.encode("a 😀", add_special_tokens=True).ids + [2]
    replies = await detokenize_stream(stub, [[i] for i in ids], skip=False)
    assert [r.text for r in replies[-6:-1]] == ["", "", "", "😀", "</s>"]
    assert "".join(r.text for r in replies) == "<s> a 😀</s>"


async def test_stream_finish_releases_held_stop_prefix(stub, stories_tok):
    ids = stories_tok.text_tokenizer.encode("the end", add_special_tokens=False).ids
    replies = await detokenize_stream(stub, [ids], stop=["end of story"])
    assert replies[0].text == "the " and replies[1].text == "end" and replies[1].done
    assert not replies[1].HasField("stop_match")


CHATML = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
          "{% if tools %}<s>tools\n{{ tools | tojson }}</s>\n{% endif %}"
          "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
          "{% if greeting is defined %}{{ greeting }}{% endif %}"
          "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('start with a user turn') }}{% endif %}")


@pytest.fixture
async def chat_stub(stories260k_dir, tmp_path):
    # stories260k has no chat template: give a copy of its tokenizer one.
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json",
                 "generation_config.json"):
        shutil.copy(stories260k_dir / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = CHATML
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    running, executor = await serve_tokenizer(load_tokenizer(str(tmp_path)), TokenizerLimits(), port=0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        from kvmesh.v1 import tokenizer_pb2_grpc
        yield tokenizer_pb2_grpc.TokenizerStub(channel), tmp_path
    await running.stop(0)
    executor.shutdown()


async def test_chat_template_renders_as_transformers_does(chat_stub):
    stub, path = chat_stub
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Say <s> please"}]
    request = pb.ApplyChatTemplateRequest(
        messages=[common_pb2.ChatMessage(**m) for m in messages], tools_json=[json.dumps(tools[0])],
        template_kwargs_json=json.dumps({"greeting": "Hey!"}))
    reply = await stub.ApplyChatTemplate(request)
    expected = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False,
                                      greeting="Hey!")
    assert reply.prompt == expected and reply.prompt.endswith("<s>assistant\nHey!")
    # The template's own <s> are control ids; the user's literal "<s>" stays text.
    assert list(reply.token_ids).count(1) == 5
    assert list(reply.token_ids) == hf.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                           greeting="Hey!", return_dict=False,
                                                           sanitize_control_tokens=True)
    bare = await stub.ApplyChatTemplate(pb.ApplyChatTemplateRequest(
        messages=request.messages[:1], add_generation_prompt=False, tokenize=False))
    assert bare.prompt == "<s>user\nHi there</s>\n" and not bare.token_ids
    info = await stub.GetInfo(common_pb2.GetInfoRequest())
    assert info.has_chat_template and "chat_template" in info.service.capabilities


async def test_chat_template_errors(chat_stub):
    stub, _ = chat_stub
    cases = [
        (pb.ApplyChatTemplateRequest(messages=[common_pb2.ChatMessage(role="assistant", content="x")]),
         "start with a user turn"),
        (pb.ApplyChatTemplateRequest(), "messages: must hold at least one message"),
        (pb.ApplyChatTemplateRequest(messages=[common_pb2.ChatMessage(role="user", content="x")],
                                     tools_json=["{not json"]), "tools_json[0]: not valid JSON"),
        (pb.ApplyChatTemplateRequest(messages=[common_pb2.ChatMessage(role="user", content="x")],
                                     template_kwargs_json='{"tokenize": false}'), "may not set tokenize"),
    ]
    for request, message in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ApplyChatTemplate(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()


async def test_no_chat_template_is_failed_precondition(stub):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ApplyChatTemplate(pb.ApplyChatTemplateRequest(
            messages=[common_pb2.ChatMessage(role="user", content="hi")]))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no chat template" in err.value.details()


async def test_stream_large_batch_goes_through_the_thread_pool(stub, stories_tok):
    # More ids than INLINE_STREAM_IDS in one message: processed off the event loop, same answer.
    from tokenizer_svc.service import INLINE_STREAM_IDS
    text = "Lily and Tom went to the park. They saw a big 🐸 and said \"héllo\"! " * 6
    ids = stories_tok.text_tokenizer.encode(text, add_special_tokens=False).ids
    assert len(ids) > INLINE_STREAM_IDS
    replies = await detokenize_stream(stub, [ids[:-3], ids[-3:]], prompt=[1])
    assert [r.num_tokens for r in replies] == [len(ids) - 3, len(ids), len(ids)]
    assert "".join(r.text for r in replies) == text


async def test_concurrent_streams_are_independent(stub, stories_tok):
    texts = [f"Story {i}: Lily saw {i} 🐸 by the pond, and Tom said \"wow\" {'!' * i}" for i in range(20)]

    async def run(text):
        ids = stories_tok.text_tokenizer.encode(text).ids
        replies = await detokenize_stream(stub, [[i] for i in ids[1:]], prompt=ids[:1], stop=["wow"])
        return "".join(r.text for r in replies), replies[-1].stop_match.stop

    results = await asyncio.gather(*(run(t) for t in texts))
    assert results == [(t[:t.index("wow")], "wow") for t in texts]


async def test_cancelled_stream_leaves_the_service_serving(stub, stories_tok):
    call = stub.DetokenizeStream()
    await call.write(pb.DetokenizeStreamRequest(start=pb.DetokenizeStreamStart()))
    await call.write(pb.DetokenizeStreamRequest(tokens=common_pb2.TokenIds(ids=[300, 301])))
    assert (await call.read()).num_tokens == 2
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call.read()
    replies = await detokenize_stream(stub, [[300]])
    assert replies[-1].done


async def test_concurrent_chat_requests_keep_control_tokens_apart(chat_stub):
    # transformers toggles encode_special_tokens on its shared backend while sanitizing; concurrent
    # renders must not see each other's setting (user "<s>" stays text, the template's is BOS).
    stub, _ = chat_stub

    def request(i):
        content = "Say <s> and </s> " * 40 if i % 2 else "hello there " * 40
        return pb.ApplyChatTemplateRequest(messages=[common_pb2.ChatMessage(role="user", content=content)])

    expected = [list((await stub.ApplyChatTemplate(request(i))).token_ids) for i in range(2)]
    replies = await asyncio.gather(*(stub.ApplyChatTemplate(request(i)) for i in range(60)))
    assert [list(r.token_ids) for r in replies] == [expected[i % 2] for i in range(60)]
