#!/usr/bin/env bash
# Sets up .venv and runs the CPU test suite (Triton kernels under TRITON_INTERPRET=1).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/engine -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The stubs must match the protos: regenerate and fail on any difference.
.venv/bin/python -c 'import sys' && PATH="$PWD/.venv/bin:$PATH" bash scripts/gen_protos.sh
if [ -n "$(git status --porcelain -- kvmesh/v1 2>/dev/null)" ]; then
  echo "generated stubs differ from protos/: run scripts/gen_protos.sh and commit kvmesh/v1" >&2
  git status --porcelain -- kvmesh/v1 >&2
  exit 1
fi
exec .venv/bin/python -m pytest "$@"
