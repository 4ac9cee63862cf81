#!/usr/bin/env bash
# Creates .venv (if missing) and installs kvmesh with its test extras into it; one line per phase.
# torch is installed first and pinned (KVMESH_TORCH_SPEC, default torch==2.13.0): with nothing
# installed, an unpinned torch requirement pulls a multi-GB CUDA build. On a GPU machine that
# already has a CUDA torch, set KVMESH_TORCH_SPEC=torch to keep it.
# Each phase's own output (pip's) is kept in a log and shown only when the phase fails.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

# phase LABEL COMMAND...: run COMMAND quietly; print "setup: LABEL (Ns)", or its output and exit on failure.
phase() {
  local label=$1 log start=$SECONDS rc=0
  shift
  log=$(mktemp "${TMPDIR:-/tmp}/kvmesh-setup.XXXXXX")
  "$@" >"$log" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "setup: $label FAILED (exit $rc); its output:" >&2
    cat "$log" >&2
    rm -f "$log"
    exit "$rc"
  fi
  rm -f "$log"
  echo "setup: $label ($((SECONDS - start))s)"
}

if [ ! -x .venv/bin/python ]; then
  phase "created .venv with $("$py" --version 2>&1)" "$py" -m venv .venv
fi
phase "pip upgraded" .venv/bin/python -m pip install -q --upgrade pip
phase "PyTorch (${KVMESH_TORCH_SPEC:-torch==2.13.0})" .venv/bin/python -m pip install -q "${KVMESH_TORCH_SPEC:-torch==2.13.0}"
phase "kvmesh and its test extras (editable)" .venv/bin/python -m pip install -q -e ".[test]"
