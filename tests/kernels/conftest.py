"""Kernel tests: compiled on a CUDA GPU, through Triton's interpreter on the CPU.

TRITON_INTERPRET must be set before triton is first imported, hence at conftest import time, and only
when no GPU is present, so that `pytest -m gpu` on the GPU machine runs the same tests compiled.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
