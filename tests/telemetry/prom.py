"""Read a /metrics page into {sample name with labels: value} (labels as prometheus-client writes
them: sorted by name)."""

from __future__ import annotations

import urllib.request


def scrape(port: int, host: str = "127.0.0.1") -> dict[str, float]:
    text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples
