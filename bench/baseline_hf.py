"""HF transformers static batching vs our continuous batching: same requests, same device, one run.

    # GPU (issue 10: keep the ratio >= 15x): the 8B shape, random weights in both
    python3 bench/baseline_hf.py --device cuda --model bench/configs/llama3-8b --load-format dummy \
        --num-requests 256 --hf-batch-size 64 --max-model-len 1024
    # CPU smoke (stories260k)
    python bench/baseline_hf.py --num-requests 8 --input-mean 16 --output-mean 12 --hf-batch-size 4

The baseline is what a user without a serving engine runs: `model.generate` on left-padded batches
(--hf-batch-size requests each, SDPA attention, HF's dynamic KV cache), every row generating the
batch's longest output (one max_new_tokens per call). Ours: every request queued at once on
EngineCore (continuous batching, paged KV). The workload is the ShareGPT-like mix of
bench/harness.py (log-normal, means 215 / 197, sigma 1; clipped to --max-model-len: 1024 above keeps
HF's padded batches short enough for one GPU run of a minute or two). Greedy, ignore_eos.
Reported: useful tokens/s of each (each request's own output length / wall time) and the ratio.

A thin wrapper: bench/batching.py does the work (--modes hf_static,continuous --workload sharegpt);
every flag of batching.py applies.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import batching  # noqa: E402


def main(argv=None) -> dict:
    return batching.main(argv, name="baseline_hf", modes="hf_static,continuous", workload_kind="sharegpt")


if __name__ == "__main__":
    sys.exit(main() and 0)
