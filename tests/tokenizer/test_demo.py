"""The built-in demo tokenizer: the kvmesh.demo vocabulary (shared with the engine's demo model),
bytes as tokens, built in code with nothing downloaded."""

from __future__ import annotations

import grpc

from kvmesh import demo
from kvmesh.v1 import common_pb2, tokenizer_pb2 as pb, tokenizer_pb2_grpc
from tokenizer_svc.demo import build_demo_tokenizer
from tokenizer_svc.limits import TokenizerLimits
from tokenizer_svc.loader import load_tokenizer
from tokenizer_svc.server import serve_tokenizer


def test_vocabulary_is_bytes_after_three_specials():
    tok = build_demo_tokenizer()
    assert tok.get_vocab_size() == demo.DEMO_VOCAB_SIZE
    assert [tok.id_to_token(i) for i in (demo.DEMO_UNK_ID, demo.DEMO_BOS_ID, demo.DEMO_EOS_ID)] == [
        "<unk>", "<s>", "</s>"]
    text = "Hi é😀"
    assert tok.encode(text).ids == [demo.DEMO_BOS_ID] + [demo.DEMO_BYTE_OFFSET + b for b in text.encode()]
    assert tok.decode(tok.encode(text).ids) == text
    # Deterministic: two builds serialize identically.
    assert build_demo_tokenizer().to_str() == tok.to_str()


async def test_demo_service():
    running, executor = await serve_tokenizer(load_tokenizer("demo"), TokenizerLimits(), port=0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = tokenizer_pb2_grpc.TokenizerStub(channel)
            info = await stub.GetInfo(common_pb2.GetInfoRequest())
            assert (info.vocab_size, info.bos_token_id, list(info.eos_token_ids), info.max_length) == (
                demo.DEMO_VOCAB_SIZE, demo.DEMO_BOS_ID, [demo.DEMO_EOS_ID], demo.DEMO_MAX_MODEL_LEN)
            assert info.service.model == demo.DEMO_MODEL_NAME and info.has_chat_template
            ids = (await stub.Tokenize(pb.TokenizeRequest(text="<s>ok"))).token_ids
            assert list(ids) == [1] + [demo.DEMO_BYTE_OFFSET + b for b in b"<s>ok"]
            chat = await stub.ApplyChatTemplate(pb.ApplyChatTemplateRequest(
                messages=[common_pb2.ChatMessage(role="user", content="hi")]))
            assert chat.prompt == "<s>user: hi\nassistant: " and chat.token_ids[0] == demo.DEMO_BOS_ID
            assert demo.DEMO_BOS_ID not in chat.token_ids[1:]
    finally:
        await running.stop(0)
        executor.shutdown()
