"""`python -m tokenizer_svc.server` as launchers start it (kvmesh.procs: --port 0 --port-file),
called by a dynamic client that knows only the service name and learns everything else through
server reflection; health SERVING; SIGTERM drains and exits 0."""

from __future__ import annotations

import json
import pathlib

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from kvmesh.procs import ServiceProcess


@pytest.fixture(scope="module")
def tokenizer_process(stories260k_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("tokenizer") / "tokenizer.log"
    proc = ServiceProcess("tokenizer", "tokenizer-test", ["--model", str(stories260k_dir), "--log-level", "INFO"],
                          log_path=str(log)).start()
    try:
        proc.wait_healthy(120.0)
        yield proc
    finally:
        proc.stop(15.0)


class ReflectedService:
    """Calls any method of a service known only by name, with message classes built from reflection."""

    def __init__(self, channel: grpc.Channel, service_name: str):
        self._channel = channel
        self.pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        self.service = self.pool.FindServiceByName(service_name)

    def message(self, method: str, **fields):
        return message_factory.GetMessageClass(self.service.methods_by_name[method].input_type)(**fields)

    def _callable(self, method: str, shape: str):
        desc = self.service.methods_by_name[method]
        response = message_factory.GetMessageClass(desc.output_type)
        return getattr(self._channel, shape)(f"/{self.service.full_name}/{desc.name}",
                                             request_serializer=lambda m: m.SerializeToString(),
                                             response_deserializer=response.FromString)

    def unary(self, method: str, request):
        return self._callable(method, "unary_unary")(request, timeout=10)

    def stream(self, method: str, requests):
        return list(self._callable(method, "stream_stream")(iter(requests), timeout=10))


def test_reflection_client_and_health(tokenizer_process, stories260k_dir):
    example = json.loads((stories260k_dir / "greedy_examples.json").read_text())["examples"][0]
    with grpc.insecure_channel(tokenizer_process.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service="kvmesh.v1.Tokenizer"), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

        svc = ReflectedService(channel, "kvmesh.v1.Tokenizer")
        assert {"Tokenize", "Detokenize", "ApplyChatTemplate", "DetokenizeStream", "GetInfo"} <= set(
            svc.service.methods_by_name)
        ids = list(svc.unary("Tokenize", svc.message("Tokenize", text=example["prompt"])).token_ids)
        assert ids == example["prompt_ids"]
        text = svc.unary("Detokenize", svc.message("Detokenize", token_ids=ids)).text
        assert text == example["prompt"] == "The dog ran"
        info = svc.unary("GetInfo", svc.message("GetInfo"))
        assert info.vocab_size == 512 and list(info.eos_token_ids) == [2, 1]

        start = svc.message("DetokenizeStream")
        start.start.prompt_token_ids.extend(ids[:2])
        start.start.stop.append("ran")
        batch = svc.message("DetokenizeStream")
        batch.tokens.ids.extend(ids[2:])
        replies = svc.stream("DetokenizeStream", [start, batch])
        # Generated: the ids after "The"; " dog " shows, "ran" matches on the last id.
        assert len(replies) == 1 and replies[0].text == " dog " and replies[0].done
        assert replies[0].stop_match.stop == "ran" and replies[0].stop_match.token_index == len(ids) - 3

        with pytest.raises(grpc.RpcError) as err:  # (empty text is valid: it encodes to BOS)
            svc.unary("Detokenize", svc.message("Detokenize"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_sigterm_drains_and_exits_zero(tokenizer_process):
    assert tokenizer_process.stop(15.0) == 0


def test_bad_model_directory_exits_2_with_a_message(tmp_path):
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-m", "tokenizer_svc.server", "--model", str(tmp_path / "nope"),
                             "--port", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "cannot load tokenizer" in result.stderr and "not a directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_startup_heap_frozen_once_ready(tokenizer_process):
    """A full collection of the tokenizer process would walk transformers and the tokenizer (~300k
    objects, ~0.2 s, a stall of every stream): the process freezes its startup heap once ready."""
    ready = [line for line in pathlib.Path(tokenizer_process.log_path).read_text().splitlines() if " ready: " in line]
    assert ready and "startup heap frozen" in ready[0]
    assert int(ready[0].rsplit("(", 1)[1].split()[0]) > 10_000

