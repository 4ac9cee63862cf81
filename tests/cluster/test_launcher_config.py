"""kvmesh.launcher's configuration pieces (no processes started)."""

from __future__ import annotations

import pytest

from kvmesh.launcher import (MAX_UNIX_SOCKET_PATH, ClusterConfig, cuda_problem, detect_gpus, tokenizer_socket,
                             tracing_env)


def test_tracing_is_off_unless_an_exporter_is_configured():
    assert tracing_env("engine-0", {}) == {"OTEL_TRACES_EXPORTER": "none",
                                           "OTEL_RESOURCE_ATTRIBUTES": "service.instance.id=engine-0"}
    on = tracing_env("engine-1", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317",
                                  "OTEL_RESOURCE_ATTRIBUTES": "team=a"})
    assert on == {"OTEL_RESOURCE_ATTRIBUTES": "team=a,service.instance.id=engine-1"}
    assert tracing_env("x", {"OTEL_TRACES_EXPORTER": "console",
                             "OTEL_RESOURCE_ATTRIBUTES": "service.instance.id=mine"}) == {}


@pytest.mark.parametrize("changes, message", [
    ({"num_engines": 0}, "num_engines=0"),
    ({"router_workers": 0}, "router_workers=0"),
    ({"device": "tpu"}, "device='tpu'"),
    ({"model": "/nonexistent/ckpt"}, "no config.json"),
    ({"startup_timeout_s": 0}, "startup_timeout_s"),
])
def test_invalid_settings_are_named(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ClusterConfig(**changes).validate()


def test_a_checkpoint_directory_is_accepted(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert ClusterConfig(model=str(tmp_path)).validate().model == str(tmp_path)


def test_gpus_come_from_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert detect_gpus() == ["2", "3"]


def test_cuda_problem_explains_a_cpu_build(tmp_path):
    """`--device cuda` with a CPU PyTorch fails before any process starts, with the fix."""
    fake_python = tmp_path / "python"  # answers like `python -c ...` under a CPU-only PyTorch
    fake_python.write_text("#!/bin/sh\necho 2.13.0+cpu\nexit 3\n")
    fake_python.chmod(0o755)
    problem = cuda_problem(str(fake_python))
    assert "PyTorch 2.13.0+cpu sees no CUDA GPU" in problem and "KVMESH_TORCH_SPEC=torch" in problem


def test_the_tokenizer_socket_lies_in_the_run_directory_unless_its_path_is_too_long(tmp_path):
    assert tokenizer_socket(str(tmp_path)) == str(tmp_path / "tokenizer.sock")
    deep = tmp_path / ("d" * (MAX_UNIX_SOCKET_PATH - len(str(tmp_path))))
    assert tokenizer_socket(str(deep)) is None  # the launcher falls back to loopback TCP
