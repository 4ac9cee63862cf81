"""Shared test fixtures: paths to the shared fixtures beside the repository."""

from __future__ import annotations

import os
import pathlib

import pytest

# Services started by tests export no traces unless a test asks (tests/telemetry passes OTEL_* to its
# children): with the spec's default (OTLP to localhost:4317) every child would retry a missing
# collector and take seconds longer to exit.
os.environ.setdefault("OTEL_TRACES_EXPORTER", "none")

# Triton decides interpreter-or-compiled when a kernel is decorated, i.e. when kernels/ is first
# imported, which engine and cluster tests do before tests/kernels is collected. So choose here, once
# for the whole session: the interpreter on a CPU-only machine, compiled kernels on a GPU.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
# KVMESH_TEST_MODELS points elsewhere (the GPU machine gets ../shared/models carried as ./models).
MODELS = pathlib.Path(os.environ.get("KVMESH_TEST_MODELS", SHARED / "models"))
STORIES260K = MODELS / "stories260k"


@pytest.fixture(scope="session")
def stories260k_dir() -> pathlib.Path:
    """The real tiny Llama checkpoint that tests use; CI has ../shared beside the clone."""
    if not (STORIES260K / "model.safetensors").exists():
        raise RuntimeError(f"missing test fixture {STORIES260K}: ../shared must sit beside the repository "
                           f"(or set KVMESH_TEST_MODELS to a folder holding stories260k/)")
    return STORIES260K
