"""What a newcomer reads first: `--help` of every command (each flag explained, defaults and choices
shown), `kvmesh --version`, and `kvmesh up`'s router and engine flags (no cluster started)."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys

import pytest

import kvmesh
from kvmesh.cli import main as cli_main
from kvmesh.launcher import ClusterConfig


def _kvmesh_subparsers() -> dict[str, argparse.ArgumentParser]:
    parsers = {}
    original = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):  # main() builds its parser, then parses: keep the parser
        parsers["kvmesh"] = self
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = capture
    try:
        with pytest.raises(SystemExit):
            cli_main.main([])
    finally:
        argparse.ArgumentParser.parse_args = original
    sub = next(a for a in parsers["kvmesh"]._actions if isinstance(a, argparse._SubParsersAction))
    return {"kvmesh": parsers["kvmesh"], **{f"kvmesh {name}": p for name, p in sub.choices.items()}}


def _service_parsers() -> dict[str, argparse.ArgumentParser]:
    from engine_svc.server import build_parser as engine_parser
    from router.server import build_parser as router_parser
    from tokenizer_svc.server import build_parser as tokenizer_parser

    return {"kvmesh-router": router_parser(), "kvmesh-engine": engine_parser(), "kvmesh-tokenizer": tokenizer_parser()}


@pytest.fixture(scope="module")
def parsers() -> dict[str, argparse.ArgumentParser]:
    return {**_kvmesh_subparsers(), **_service_parsers()}


def test_every_flag_has_help_and_shows_its_default_and_choices(parsers):
    assert {"kvmesh generate", "kvmesh up", "kvmesh health", "kvmesh-router"} <= set(parsers)
    for name, parser in parsers.items():
        text = parser.format_help()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            flag = action.option_strings[0] if action.option_strings else action.dest
            assert action.help and action.help.split("[env")[0].strip(), f"{name} {flag}: no help text"
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS, "", []):
                shown = ",".join(map(str, action.default)) if isinstance(action.default, list) else action.default
                assert f"(default: {shown})" in " ".join(text.split()), f"{name} {flag}: default not shown"
            if action.choices and not isinstance(action.choices, dict):
                assert "{" + ",".join(map(str, action.choices)) + "}" in text, f"{name} {flag}: choices not shown"


def test_up_help_names_the_router_and_engine_flags(parsers):
    text = " ".join(parsers["kvmesh up"].format_help().split())
    for flag in ("--host", "--port", "--http-port", "--dtype", "--max-model-len", "--max-num-seqs",
                 "--gpu-memory-utilization", "--kv-cache-memory"):
        assert flag in text
    assert "(default: 50051)" in text  # where `kvmesh generate` looks by default


def test_version():
    out = subprocess.run([sys.executable, "-m", "kvmesh.cli.main", "--version"], capture_output=True, text=True,
                         timeout=60)
    assert (out.returncode, out.stdout.strip()) == (0, f"kvmesh {kvmesh.__version__}")


def test_engine_settings_become_engine_flags():
    config = ClusterConfig(dtype="float32", max_model_len=256, max_num_seqs=8, gpu_memory_utilization=0.5,
                           kv_cache_memory=1 << 20, kv_cache_dtype="fp8").validate()
    assert config.engine_flags() == ["--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "8",
                                     "--gpu-memory-utilization", "0.5", "--kv-cache-memory", "1048576",
                                     "--kv-cache-dtype", "fp8"]
    assert ClusterConfig().engine_flags() == [] and ClusterConfig().port == 50051


@pytest.mark.parametrize("changes, message", [
    ({"port": 70000}, "port=70000"),
    ({"http_port": 50051}, "also the gRPC port"),
    ({"max_num_seqs": 0}, "max_num_seqs=0"),
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization=1.5"),
    ({"kv_cache_dtype": "int4"}, "kv_cache_dtype='int4': use one of auto, fp8, fp8_e4m3"),
])
def test_bad_up_settings_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        ClusterConfig(**changes).validate()


def test_up_on_a_taken_port_says_so_before_starting_anything():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "kvmesh.cli.main", "up", "--port", str(port)],
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"--port {port}: address already in use" in out.stderr and "--port 0" in out.stderr
    assert "engine" not in out.stdout  # nothing was started
