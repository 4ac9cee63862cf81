#!/usr/bin/env bash
# Creates .venv (if missing) and installs kvmesh with its test extras into it.
# torch is installed first and pinned (KVMESH_TORCH_SPEC, default torch==2.13.0): with nothing
# installed, an unpinned torch requirement pulls a multi-GB CUDA build. On a GPU machine that
# already has a CUDA torch, set KVMESH_TORCH_SPEC=torch to keep it.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "${KVMESH_TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e ".[test]"
