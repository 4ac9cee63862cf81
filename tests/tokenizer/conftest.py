"""Fixtures for the tokenizer tier: the stories260k tokenizer (loaded once) and a real server on a
loopback port per test, talked to through the generated stubs."""

from __future__ import annotations

import pytest

from kvmesh.serving.channels import create_channel
from kvmesh.v1 import tokenizer_pb2_grpc
from tok_support import TEST_LIMITS, TEST_MAX_MESSAGE_BYTES
from tokenizer_svc.loader import LoadedTokenizer, load_tokenizer
from tokenizer_svc.server import serve_tokenizer


@pytest.fixture(scope="session")
def stories_tok(stories260k_dir) -> LoadedTokenizer:
    return load_tokenizer(str(stories260k_dir))


@pytest.fixture
async def tokenizer_server(stories_tok):
    running, executor = await serve_tokenizer(stories_tok, TEST_LIMITS, port=0,
                                              max_message_bytes=TEST_MAX_MESSAGE_BYTES)
    yield running
    await running.stop(0)
    executor.shutdown(wait=True)


@pytest.fixture
async def channel(tokenizer_server):
    async with create_channel(f"127.0.0.1:{tokenizer_server.port}",
                              max_message_bytes=4 * TEST_MAX_MESSAGE_BYTES) as channel:
        yield channel


@pytest.fixture
def stub(channel) -> tokenizer_pb2_grpc.TokenizerStub:
    return tokenizer_pb2_grpc.TokenizerStub(channel)
