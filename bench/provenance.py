"""Where a benchmark result came from: the CPU's name and the git commit, for every results file."""

from __future__ import annotations

import json
import os
import pathlib
import platform
import subprocess

REPO = pathlib.Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return name


def git_commit() -> str:
    """KVMESH_COMMIT when set (the GPU machine: the tree travels without this checkout's .git, and a
    .git found there named a stale commit), else HEAD of this checkout."""
    if os.environ.get("KVMESH_COMMIT"):
        return os.environ["KVMESH_COMMIT"]
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
        commit = out.stdout.strip()
    except OSError:
        commit = ""
    return commit or "unknown"


def device_name(device: str) -> str:
    """What ran the benchmark: the GPU's name for cuda[:N], else the CPU's with torch's thread count."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu: {cpu_name()} ({torch.get_num_threads()} threads)"


def write_report(report: dict, out: str | None) -> None:
    """Print a benchmark's JSON report, and write it to `out` when given."""
    text = json.dumps(report, indent=1)
    if out:
        pathlib.Path(out).write_text(text + "\n")
    print(text)
