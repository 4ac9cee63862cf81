"""kernels/skinny_gemm.py against F.linear in float64: random inputs, poisoned outputs, strided rows,
uneven K, bias, and the dispatch between it and cuBLAS."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import DEVICE

from kernels.skinny_gemm import MAX_M, make_linear, skinny_linear

BUDGET = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def rel_err(a, b):
    assert not a.isnan().any(), "NaN in output (unwritten element?)"
    return ((a.double() - b).norm() / b.norm()).item()


def reference(x, w, b):
    return torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 40, 64), (5, 100, 100), (16, 24, 96), (3, 17, 33)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_linear(dtype, m, n, k, with_bias):
    wide = torch.randn(m, k + 7, device=DEVICE).to(dtype)
    x = wide[:, :k]  # row stride k + 7
    w = (torch.randn(n, k, device=DEVICE) / k ** 0.5).to(dtype)
    b = torch.randn(n, device=DEVICE).to(dtype) if with_bias else None
    out = torch.full((m, n), float("nan"), device=DEVICE, dtype=dtype)
    got = skinny_linear(x, w, b, out=out)
    assert got is out
    assert rel_err(got, reference(x, w, b)) < BUDGET[dtype]


@pytest.mark.parametrize("block_n,block_k", [(16, 16), (32, 64)])
def test_tile_overrides_walk_other_tiles(block_n, block_k):
    x = torch.randn(7, 200, device=DEVICE)
    w = torch.randn(90, 200, device=DEVICE)
    got = skinny_linear(x, w, plan_overrides={"block_n": block_n, "block_k": block_k})
    assert rel_err(got, reference(x, w, None)) < BUDGET[torch.float32]


def test_rejects_what_it_cannot_do():
    w = torch.randn(8, 32, device=DEVICE)
    with pytest.raises(ValueError, match="rows > MAX_M"):
        skinny_linear(torch.randn(MAX_M + 1, 32, device=DEVICE), w)
    with pytest.raises(ValueError, match="weight: expected"):
        skinny_linear(torch.randn(2, 31, device=DEVICE), w)
    with pytest.raises(ValueError, match="dtype"):
        skinny_linear(torch.randn(2, 32, device=DEVICE).half(), w)
    with pytest.raises(ValueError, match="bias: expected"):
        skinny_linear(torch.randn(2, 32, device=DEVICE), w, torch.randn(9, device=DEVICE))


@pytest.mark.parametrize("max_m", [0, 4, MAX_M])
@pytest.mark.parametrize("m", [1, 4, 5, MAX_M + 3])
def test_dispatch_agrees_with_linear_on_both_sides(max_m, m):
    linear = make_linear(max_m)
    x, w, b = torch.randn(m, 48, device=DEVICE), torch.randn(20, 48, device=DEVICE), torch.randn(20, device=DEVICE)
    assert rel_err(linear(x, w, b), reference(x, w, b)) < 1e-5  # cuBLAS fp32 may use its own order


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (4096, 14336), (28672, 4096)])
def test_gpu_real_sizes_in_a_cuda_graph(n, k):
    """The 8B shape's projections at decode batch sizes, replayed from a CUDA graph as the engine runs them."""
    w = (torch.randn(n, k, device="cuda") / k ** 0.5).bfloat16()
    for m in (1, 8, MAX_M):
        x = torch.randn(m, k, device="cuda").bfloat16()
        out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        skinny_linear(x, w, out=out)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            skinny_linear(x, w, out=out)
        x.copy_(torch.randn(m, k, device="cuda").bfloat16())  # new inputs, same buffers
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, reference(x, w, None)) < BUDGET[torch.bfloat16]
