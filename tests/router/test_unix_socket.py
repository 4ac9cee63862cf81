"""The tokenizer tier on a unix-domain socket (tokenizer_svc --unix-socket), real processes: its
TCP port still answers, and a router that dials it at unix:PATH answers generations exactly as the
greedy oracle says and leaves every KV block free."""

from __future__ import annotations

import json
import tempfile

import grpc
import pytest

from kvmesh.procs import ServiceProcess, stop_all
from kvmesh.serving.channels import create_channel
from kvmesh.v1 import router_pb2, router_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc
from tests.router.client import engines_idle, generate, greedy, wait_replicas
from tests.router.conftest import CHILD_ENV, START_TIMEOUT_S

ENGINES = ["b", "c"]


@pytest.fixture(scope="module")
def unix_tokenizer(mesh):
    """A tokenizer listening on a loopback port and on a unix socket; yields (process, socket path)."""
    path = f"{tempfile.mkdtemp(prefix='kvmesh-uds-')}/tokenizer.sock"
    proc = ServiceProcess("tokenizer", "tokenizer-uds", ["--model", str(mesh.model_dir), "--unix-socket", path],
                          log_path=str(mesh.log_dir / "tokenizer-uds.log"), env=CHILD_ENV, die_with_parent=True)
    try:
        proc.start().wait_healthy(START_TIMEOUT_S)
        yield proc, path
    finally:
        stop_all([proc], timeout_s=10)


async def test_both_addresses_answer_alike(unix_tokenizer):
    proc, path = unix_tokenizer
    replies = []
    for target in (proc.address, f"unix:{path}"):
        async with create_channel(target) as channel:
            reply = await tokenizer_pb2_grpc.TokenizerStub(channel).Tokenize(
                tokenizer_pb2.TokenizeRequest(text="Once upon a time"))
            replies.append(list(reply.token_ids))
    assert replies[0] == replies[1] and replies[0]


async def test_a_router_dialing_the_socket_generates_and_frees_its_blocks(mesh, unix_tokenizer, stories260k_dir):
    _, path = unix_tokenizer
    async with create_channel(f"unix:{path}") as channel:
        tokenizer = tokenizer_pb2_grpc.TokenizerStub(channel)
        prompts = {}  # prompt text as the tokenizer decodes its ids (the oracle's expected_text starts with it)
        for ex in json.loads((stories260k_dir / "greedy_examples.json").read_text())["examples"]:
            prompts[ex["prompt"]] = (await tokenizer.Detokenize(
                tokenizer_pb2.DetokenizeRequest(token_ids=ex["prompt_ids"]))).text
    router = mesh.router(ENGINES, "--tokenizer", f"unix:{path}")  # the later --tokenizer wins
    examples = json.loads((stories260k_dir / "greedy_examples.json").read_text())["examples"]
    addresses = [mesh.engines[n].address for n in ENGINES]
    async with create_channel(router.address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        await wait_replicas(stub, len(ENGINES))
        for ex in examples:
            res = await generate(stub, router_pb2.RouterGenerateRequest(
                text=ex["prompt"], sampling=greedy(ex["max_new_tokens"]), return_tokens=True))
            assert res.status == grpc.StatusCode.OK, res.details
            assert res.token_ids == ex["expected_ids"][:ex["max_new_tokens"]]
            assert res.text == ex["expected_text"][len(prompts[ex["prompt"]]):]
    loads = await engines_idle(addresses)
    assert all(r.in_use_blocks == 0 and r.free_blocks + r.cached_blocks == r.total_blocks for r in loads.values())


def test_a_path_taken_by_another_file_fails_the_start(mesh, tmp_path):
    # (a stale socket file is replaced: grpc unlinks a socket before it binds the path)
    taken = tmp_path / "tokenizer.sock"
    taken.write_text("not a socket")
    proc = ServiceProcess("tokenizer", "tokenizer-uds-taken", ["--model", str(mesh.model_dir), "--unix-socket",
                                                                str(taken)],
                          log_path=str(mesh.log_dir / "tokenizer-uds-taken.log"), env=CHILD_ENV, die_with_parent=True)
    proc.start()
    try:
        with pytest.raises(RuntimeError, match="exited"):
            proc.wait_listening(START_TIMEOUT_S)
    finally:
        stop_all([proc], timeout_s=10)
    assert f"could not bind unix:{taken}" in (mesh.log_dir / "tokenizer-uds-taken.log").read_text()
