"""Shared test fixtures: paths to the shared fixtures beside the repository."""

from __future__ import annotations

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
STORIES260K = SHARED / "models" / "stories260k"


@pytest.fixture(scope="session")
def stories260k_dir() -> pathlib.Path:
    """The real tiny Llama checkpoint that tests use; CI has ../shared beside the clone."""
    if not (STORIES260K / "model.safetensors").exists():
        raise RuntimeError(f"missing test fixture {STORIES260K}: ../shared must sit beside the repository")
    return STORIES260K
