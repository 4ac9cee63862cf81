"""Sampling kernels: counter-based Gumbel noise fused with the argmax, and the penalties in one pass.

The noise for vocabulary entry v of a row is a pure function of (seed, step, v):

    k1 = mix32(mix32(seed_lo ^ 0x68BC21EB) ^ step)      k2 = mix32(mix32(seed_hi ^ k1) ^ 0x02E5BE93)
    h  = mix32(mix32(mix32(v ^ 0x5BD1E995) ^ k1) ^ k2)   u  = ((h >> 8) + 0.5) / 2^24  in (0, 1)
    gumbel = -log(-log(u))

(mix32 is Wellons' lowbias32), so a row draws the same token whatever the batch around it and however
the vocabulary is split between programs. The Triton kernels (CUDA) and the plain-PyTorch functions
(`*_reference`: the CPU path, and the oracle of tests/kernels/test_sampling.py) compute the same
integers exactly; the float noise agrees to rounding (the GPU's log is not bit-identical to the CPU's).

Imports torch and triton only, never the engine.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._checks import check_tensor

M32 = 0xFFFFFFFF
BLOCK = 1024  # vocabulary entries per inner iteration
SPLIT = 8192  # vocabulary entries per program of the argmax (V=128256 -> 16 programs per row)


# ---- the hash, in Triton (uint32 arithmetic wraps mod 2^32) ----
# Constants as constexpr ints, as triton.language.random's Philox uses them: an int above 2^31 is
# uint32, so uint32 * C and uint32 ^ C stay uint32.
MUL_A = tl.constexpr(0x7FEB352D)
MUL_B = tl.constexpr(0x846CA68B)
VOCAB_SALT = tl.constexpr(0x5BD1E995)
SEED_SALT = tl.constexpr(0x68BC21EB)
KEY_SALT = tl.constexpr(0x02E5BE93)


@triton.jit
def _mix32(x):
    """Wellons' lowbias32 on uint32."""
    x = x ^ (x >> 16)
    x = x * MUL_A
    x = x ^ (x >> 15)
    x = x * MUL_B
    return x ^ (x >> 16)


@triton.jit
def _row_keys(seed, step):
    """(seed int64, step int64) scalars -> the row's two uint32 keys."""
    lo = (seed & 0xFFFFFFFF).to(tl.uint32)
    hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    s = (step & 0xFFFFFFFF).to(tl.uint32)
    k1 = _mix32(_mix32(lo ^ SEED_SALT) ^ s)
    k2 = _mix32(_mix32(hi ^ k1) ^ KEY_SALT)
    return k1, k2


@triton.jit
def _uniform(cols, k1, k2):
    """cols: int32 block of vocabulary ids -> uniforms in (0, 1), fp32."""
    h = _mix32(_mix32(_mix32(cols.to(tl.uint32) ^ VOCAB_SALT) ^ k1) ^ k2)
    return ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)


@triton.jit
def _uniform_noise_kernel(
    out_ptr,  # [num_rows, V] fp32
    seeds_ptr,  # [num_rows] int64
    steps_ptr,  # [num_rows] int64
    V,
    BLOCK: tl.constexpr,  # columns per program
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    k1, k2 = _row_keys(tl.load(seeds_ptr + row), tl.load(steps_ptr + row))
    tl.store(out_ptr + row * V + cols, _uniform(cols, k1, k2), mask=cols < V)


@triton.jit
def _gumbel_argmax_kernel(
    best_val_ptr,  # [num_rows, num_splits] fp32: each program's best (logit + noise)
    best_idx_ptr,  # [num_rows, num_splits] int64: and where it is
    logits_ptr,  # [num_rows, V] fp32, row stride free
    seeds_ptr,  # [num_rows] int64
    steps_ptr,  # [num_rows] int64
    greedy_ptr,  # [num_rows] int64: 1 = plain argmax (no noise)
    stride_l, num_splits, V,
    BLOCK: tl.constexpr,  # columns per iteration
    SPLIT: tl.constexpr,  # columns per program, a multiple of BLOCK
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    greedy = tl.load(greedy_ptr + row)
    k1, k2 = _row_keys(tl.load(seeds_ptr + row), tl.load(steps_ptr + row))
    # Per lane: the best value seen and its id (strict ">": the earliest, i.e. lowest, id on ties).
    best_val = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = split * SPLIT + tl.arange(0, BLOCK)
    for start in range(split * SPLIT, split * SPLIT + SPLIT, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(logits_ptr + row * stride_l + cols, mask=cols < V, other=float("-inf"))
        if greedy == 0:
            x = x - tl.log(-tl.log(_uniform(cols, k1, k2)))
        better = x > best_val
        best_val = tl.where(better, x, best_val)
        best_idx = tl.where(better, cols, best_idx)
    val = tl.max(best_val, axis=0)
    # ties across lanes go to the lowest id, as torch.argmax does
    idx = tl.min(tl.where(best_val == val, best_idx, V + SPLIT), axis=0)
    tl.store(best_val_ptr + row * num_splits + split, val)
    tl.store(best_idx_ptr + row * num_splits + split, idx.to(tl.int64))


def _check_rows(logits: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> None:
    check_tensor("logits", logits, ndim=2, dtypes=(torch.float32,))
    for name, t in (("seeds", seeds), ("steps", steps)):
        check_tensor(name, t, ndim=1, dtypes=(torch.int64,), contiguous=True, device=logits.device)
        if t.shape[0] != logits.shape[0]:
            raise ValueError(f"{name}: {t.shape[0]} rows, logits has {logits.shape[0]}")


def gumbel_argmax(logits: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor,
                  greedy: torch.Tensor) -> torch.Tensor:
    """One token per row: argmax(logits + Gumbel noise of (seed, step, v)), or plain argmax where greedy.

    Args:
        logits: ``[num_rows, V]`` fp32 (processed: -inf where a token is not allowed), row stride free.
        seeds: ``[num_rows]`` int64, the requests' 64-bit seeds (read as unsigned bits).
        steps: ``[num_rows]`` int64, tokens each request has generated so far.
        greedy: ``[num_rows]`` int64, 1 where the row takes the plain argmax.

    Returns:
        ``[num_rows]`` int64 token ids; ties go to the lowest id (as torch.argmax).

    Grid: (num_rows, ceil(V / SPLIT)); a torch argmax over the ``ceil(V / SPLIT)`` partials finishes.
    """
    _check_rows(logits, seeds, steps)
    check_tensor("greedy", greedy, ndim=1, dtypes=(torch.int64,), contiguous=True, device=logits.device)
    num_rows, V = logits.shape
    split = min(SPLIT, triton.next_power_of_2(V))
    num_splits = triton.cdiv(V, split)
    best_val = torch.empty((num_rows, num_splits), dtype=torch.float32, device=logits.device)
    best_idx = torch.empty((num_rows, num_splits), dtype=torch.int64, device=logits.device)
    if num_rows == 0:
        return best_idx[:, 0]
    _gumbel_argmax_kernel[(num_rows, num_splits)](
        best_val, best_idx, logits, seeds, steps, greedy, logits.stride(0), num_splits, V,
        BLOCK=min(BLOCK, split), SPLIT=split, num_warps=4)
    if num_splits == 1:
        return best_idx[:, 0]
    return best_idx.gather(1, best_val.argmax(dim=1, keepdim=True))[:, 0]


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, V: int) -> torch.Tensor:
    """The uniforms behind gumbel_argmax, ``[num_rows, V]`` fp32 (for tests against the reference)."""
    num_rows = seeds.shape[0]
    out = torch.empty((num_rows, V), dtype=torch.float32, device=seeds.device)
    if num_rows:
        _uniform_noise_kernel[(num_rows, triton.cdiv(V, BLOCK))](out, seeds, steps, V, BLOCK=BLOCK)
    return out


# ---- the same maths in PyTorch (int64 holding uint32 values): the CPU path and the tests' oracle ----

def mix32(x):
    """Wellons' lowbias32 on ints or int64 tensors holding values in [0, 2^32).

    x * c can exceed 2^63; int64 multiplication wraps mod 2^64, whose low 32 bits are the exact
    product mod 2^32 (tests check this against Python's unbounded ints)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def row_keys_reference(seeds: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n] int64 seeds and steps -> the two uint32 keys per row (as int64)."""
    lo, hi = seeds & M32, (seeds >> 32) & M32
    k1 = mix32(mix32(lo ^ 0x68BC21EB) ^ (steps & M32))
    k2 = mix32(mix32(hi ^ k1) ^ 0x02E5BE93)
    return k1, k2


def vocab_hash(V: int, device) -> torch.Tensor:
    """mix32(v ^ 0x5BD1E995) for v in [0, V): the per-column half of the hash, int64 [V]."""
    return mix32(torch.arange(V, dtype=torch.int64, device=device) ^ 0x5BD1E995)


def uniform_noise_reference(seeds: torch.Tensor, steps: torch.Tensor, V: int,
                            vhash: torch.Tensor | None = None) -> torch.Tensor:
    """[n] seeds, steps -> uniforms in (0, 1), fp32 [n, V] (vhash: a cached vocab_hash(V))."""
    k1, k2 = row_keys_reference(seeds, steps)
    vh = vocab_hash(V, seeds.device) if vhash is None else vhash
    h = mix32(mix32(vh[None, :] ^ k1[:, None]) ^ k2[:, None])
    return ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))


def gumbel_argmax_reference(logits: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor,
                            greedy: torch.Tensor, vhash: torch.Tensor | None = None,
                            chunk_elems: int = 1 << 22) -> torch.Tensor:
    """gumbel_argmax in PyTorch; the noise is made for the sampled rows only, ``chunk_elems`` at a
    time (it needs a few int64 temporaries of the chunk's size)."""
    _check_rows(logits, seeds, steps)
    num_rows, V = logits.shape
    out = logits.argmax(dim=-1) if num_rows else torch.empty(0, dtype=torch.int64, device=logits.device)
    rows = torch.nonzero(greedy == 0).flatten()
    if rows.numel() == 0:
        return out
    vh = vocab_hash(V, logits.device) if vhash is None else vhash
    chunk = max(1, chunk_elems // V)
    for start in range(0, rows.numel(), chunk):
        r = rows[start:start + chunk]
        u = uniform_noise_reference(seeds[r], steps[r], V, vh)
        out[r] = torch.argmax(logits[r] - torch.log(-torch.log(u)), dim=-1)
    return out
