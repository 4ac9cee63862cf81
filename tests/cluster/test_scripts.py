"""scripts/setup.sh speaks one line per phase and, when a phase fails, shows that phase's own output
(pip's error) instead of swallowing it."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_setup_prints_one_line_per_phase_and_shows_a_failing_phase():
    env = {**os.environ, "KVMESH_TORCH_SPEC": "torch==0.0.1"}  # no such release: the PyTorch phase fails
    out = subprocess.run(["bash", "scripts/setup.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0
    assert re.fullmatch(r"setup: pip upgraded \(\d+s\)\n", out.stdout), out.stdout  # nothing but the phase line
    assert "setup: PyTorch (torch==0.0.1) FAILED" in out.stderr
    assert "ERROR:" in out.stderr and "torch==0.0.1" in out.stderr.split("FAILED", 1)[1]  # pip's own words
