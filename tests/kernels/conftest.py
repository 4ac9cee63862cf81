"""Kernel tests: compiled on a CUDA GPU, through Triton's interpreter on the CPU.

TRITON_INTERPRET is chosen once for the whole session in tests/conftest.py (before any test module
imports kernels/), so that `pytest -m gpu` on the GPU machine runs the same tests compiled.
"""
