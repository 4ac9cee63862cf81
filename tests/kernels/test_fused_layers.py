"""rms_norm, apply_rotary and silu_and_mul against their PyTorch references."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_cases import DEVICE

from kernels.activation import silu_and_mul, silu_and_mul_reference
from kernels.rms_norm import rms_norm, rms_norm_reference
from kernels.rotary import apply_rotary, apply_rotary_reference, build_cos_sin_cache

# Relative-norm budgets: fp32 paths round differently only at the last bit; half types round once
# in the kernel and once or more in the reference.
BUDGET = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def rel_err(a, b):
    assert not a.isnan().any(), "NaN in output (unwritten element?)"
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 200])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, hidden, with_residual):
    wide = torch.randn(7, hidden + 9, device=DEVICE).to(dtype)
    x = wide[:, :hidden]  # row stride hidden + 9
    w = torch.randn(hidden, device=DEVICE).to(dtype)
    res = torch.randn(7, hidden, device=DEVICE).to(dtype) if with_residual else None
    out, new_res = rms_norm(x, w, 1e-5, res)
    ref_out, ref_res = rms_norm_reference(x, w, 1e-5, res)
    assert rel_err(out, ref_out) < BUDGET[dtype]
    assert torch.equal(new_res, ref_res)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 2, 64), (3, 1, 80), (2, 2, 256)])
def test_rotary(dtype, num_heads, num_kv_heads, head_dim):
    T = 9
    qkv = torch.randn(T, (num_heads + 2 * num_kv_heads) * head_dim, device=DEVICE).to(dtype)
    q = qkv[:, : num_heads * head_dim].view(T, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim: (num_heads + num_kv_heads) * head_dim].view(T, num_kv_heads, head_dim)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=DEVICE).float() / head_dim))
    cache = build_cos_sin_cache(inv_freq, 4096, dtype)
    positions = torch.randint(0, 4096, (T,), device=DEVICE)
    positions[0] = 4095
    q_ref, k_ref = q.clone(), k.clone()
    apply_rotary_reference(q_ref, k_ref, positions, cache)
    v_before = qkv[:, (num_heads + num_kv_heads) * head_dim:].clone()
    got_q, got_k = apply_rotary(q, k, positions, cache)
    assert got_q is q and got_k is k
    assert rel_err(q, q_ref) < BUDGET[dtype] and rel_err(k, k_ref) < BUDGET[dtype]
    assert torch.equal(qkv[:, (num_heads + num_kv_heads) * head_dim:], v_before), "v must be untouched"


def test_rotary_matches_hf_rotate_half():
    # transformers' formula: x * cos + rotate_half(x) * sin with cos = cat(freqs, freqs).cos()
    head_dim, T = 64, 5
    x = torch.randn(T, 2, head_dim, device=DEVICE)
    inv_freq = 1.0 / (500000 ** (torch.arange(0, head_dim, 2, device=DEVICE).float() / head_dim))
    pos = torch.arange(T, device=DEVICE) * 37
    emb = torch.cat([pos[:, None].float() * inv_freq] * 2, dim=-1)[:, None]
    hf = x * emb.cos() + torch.cat((-x[..., head_dim // 2:], x[..., : head_dim // 2]), dim=-1) * emb.sin()
    q = x.clone()
    apply_rotary(q, q[:, :1].clone(), pos, build_cos_sin_cache(inv_freq, 200))
    assert rel_err(q, hf) < 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [100, 1500])
def test_silu_and_mul(dtype, inter):
    x = torch.randn(5, 2 * inter + 3, device=DEVICE).to(dtype)[:, : 2 * inter]
    assert rel_err(silu_and_mul(x), silu_and_mul_reference(x)) < BUDGET[dtype]


def test_rejects_bad_arguments():
    x = torch.randn(3, 64, device=DEVICE)
    with pytest.raises(ValueError, match="weight: dtype float16 not supported; use float32"):
        rms_norm(x, torch.ones(64, device=DEVICE, dtype=torch.float16), 1e-5)
    with pytest.raises(ValueError, match=r"residual: expected shape \[3, 64\]"):
        rms_norm(x, torch.ones(64, device=DEVICE), 1e-5, x[:2])
    with pytest.raises(ValueError, match="last dim 63 must be even"):
        silu_and_mul(x[:, :63])
    q = torch.randn(2, 2, 64, device=DEVICE)
    with pytest.raises(ValueError, match=r"cos_sin_cache: expected shape \[\*, 64\]"):
        apply_rotary(q, q.clone(), torch.zeros(2, dtype=torch.int64, device=DEVICE), torch.ones(10, 32, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_fused_real_sizes(dtype):
    x = torch.randn(4096, 4096, device="cuda", dtype=dtype)
    w = torch.randn(4096, device="cuda", dtype=dtype)
    res = torch.randn_like(x)
    out, r = rms_norm(x, w, 1e-5, res)
    ro, rr = rms_norm_reference(x, w, 1e-5, res)
    assert rel_err(out, ro) < BUDGET[dtype] and torch.equal(r, rr)
    g = torch.randn(4096, 2 * 14336, device="cuda", dtype=dtype)
    assert rel_err(silu_and_mul(g), silu_and_mul_reference(g)) < BUDGET[dtype]
    q = torch.randn(4096, 32, 128, device="cuda", dtype=dtype)
    k = torch.randn(4096, 8, 128, device="cuda", dtype=dtype)
    inv_freq = 1.0 / (500000 ** (torch.arange(0, 128, 2, device="cuda").float() / 128))
    cache = build_cos_sin_cache(inv_freq, 131072, dtype)
    pos = torch.randint(0, 131072, (4096,), device="cuda")
    qr, kr = q.clone(), k.clone()
    apply_rotary_reference(qr, kr, pos, cache)
    apply_rotary(q, k, pos, cache)
    assert rel_err(q, qr) < BUDGET[dtype] and rel_err(k, kr) < BUDGET[dtype]
    assert math.isfinite(q.float().sum().item())
