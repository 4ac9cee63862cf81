#!/usr/bin/env bash
# Sets up .venv and runs the CPU test suite (Triton kernels under TRITON_INTERPRET=1).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/engine -x`.
# One line per phase before pytest's own output; a failing phase shows its output and stops.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The stubs must match the protos: regenerate and fail on any difference.
PATH="$PWD/.venv/bin:$PATH" bash scripts/gen_protos.sh
if [ -n "$(git status --porcelain -- kvmesh/v1 2>/dev/null)" ]; then
  echo "generated stubs differ from protos/: run scripts/gen_protos.sh and commit kvmesh/v1" >&2
  git status --porcelain -- kvmesh/v1 >&2
  exit 1
fi
echo "test: stubs match protos/"
exec .venv/bin/python -m pytest "$@"
