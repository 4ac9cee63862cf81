#!/usr/bin/env bash
# The README's main job: set up .venv (idempotent; the first run installs CPU PyTorch and kvmesh) and
# run a local cluster: a tokenizer, two engines and a router on loopback, answering a sample
# generation. Arguments go to `kvmesh up` (e.g. --once, --model DIR, --device cuda, --num-engines 3).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
if [ ! -x "$repo/.venv/bin/kvmesh" ]; then
  echo "kvmesh up: first run: creating .venv and installing PyTorch (CPU) and kvmesh; this takes a few minutes" >&2
fi
# One line per setup phase; a failing phase prints its own output (pip's error) and stops here.
if ! bash "$repo/scripts/setup.sh" >&2; then
  echo "kvmesh up: setup failed (see above)" >&2
  exit 1
fi
# exec from the caller's directory (relative --model paths mean what they say): Ctrl-C and SIGTERM
# reach the launcher itself, which drains and stops every child.
exec "$repo/.venv/bin/kvmesh" up "$@"
