"""The sampling kernels (Gumbel-argmax noise, penalties) against their PyTorch references.

On the CPU the Triton kernels run in the interpreter (small shapes); `pytest -m gpu` adds the real
vocabulary size compiled.
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import DEVICE

from kernels.sampling import SPLIT, gumbel_argmax, gumbel_argmax_reference, uniform_noise, uniform_noise_reference
from kernels.sampling_penalties import apply_penalties, apply_penalties_reference

EDGE_SEEDS = [0, 1, 2**32 - 1, 2**32, 2**63 - 1, 0x5BD1E995_68BC21EB]


def _rows(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    seeds = torch.randint(0, 2**63 - 1, (n,), generator=gen)
    seeds[:len(EDGE_SEEDS)] = torch.tensor(EDGE_SEEDS[:n])
    steps = torch.randint(0, 2**33, (n,), generator=gen)  # above 2^32: only the low 32 bits count
    return seeds.to(DEVICE), steps.to(DEVICE)


@pytest.mark.parametrize("V", [1, 37, 1000, 3000])
def test_uniform_noise_matches_reference_bit_for_bit(V):
    seeds, steps = _rows(8, V)
    got, ref = uniform_noise(seeds, steps, V), uniform_noise_reference(seeds, steps, V)
    assert torch.equal(got, ref)
    assert 0.0 < float(got.min()) and float(got.max()) < 1.0


@pytest.mark.parametrize("V", [37, 3000, SPLIT + 5000])  # the last: several programs per row
def test_gumbel_argmax_matches_reference(V):
    n = 6 if V < SPLIT else 3
    seeds, steps = _rows(n, V)
    logits = torch.randn(n, V, generator=torch.Generator().manual_seed(V)).to(DEVICE) * 2
    logits[0, ::3] = float("-inf")  # removed tokens are never drawn
    greedy = torch.zeros(n, dtype=torch.int64, device=DEVICE)
    greedy[1] = 1
    got = gumbel_argmax(logits, seeds, steps, greedy)
    assert torch.equal(got, gumbel_argmax_reference(logits, seeds, steps, greedy))
    assert int(got[1]) == int(logits[1].argmax()) and int(got[0]) % 3 != 0


def test_gumbel_argmax_greedy_ties_go_to_the_lowest_id_across_programs():
    V = 2 * SPLIT + 10
    logits = torch.zeros(2, V, device=DEVICE)
    logits[0, [5, SPLIT + 3, 2 * SPLIT + 1]] = 4.0  # a tie in three programs
    logits[1, [SPLIT + 3, SPLIT + 9]] = 4.0  # a tie inside one program, not the first
    seeds, steps = _rows(2)
    got = gumbel_argmax(logits, seeds, steps, torch.ones(2, dtype=torch.int64, device=DEVICE))
    assert got.tolist() == logits.argmax(dim=-1).tolist() == [5, SPLIT + 3]


def test_gumbel_argmax_row_depends_on_its_own_seed_and_step_only():
    V, n = 500, 8
    seeds, steps = _rows(n, 3)
    logits = torch.randn(n, V, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    greedy = torch.zeros(n, dtype=torch.int64, device=DEVICE)
    whole = gumbel_argmax(logits, seeds, steps, greedy)
    order = torch.tensor([5, 2, 7], device=DEVICE)
    part = gumbel_argmax(logits[order], seeds[order], steps[order], greedy[order])
    assert torch.equal(part, whole[order])
    other_step = gumbel_argmax(logits, seeds, steps + 1, greedy)
    assert not torch.equal(other_step, whole)  # 8 rows over 500 ids: all equal has odds ~1e-13


@pytest.mark.gpu  # 4000 programs: minutes in the interpreter (the CPU path's draws are tested in tests/engine)
def test_gumbel_argmax_draws_follow_softmax():
    V, n = 6, 4000
    row = torch.tensor([2.0, 1.0, 0.0, -1.0, float("-inf"), 0.5], device=DEVICE)
    seeds = torch.arange(n, dtype=torch.int64, device=DEVICE) * 7919
    tokens = gumbel_argmax(row.expand(n, V), seeds, torch.zeros(n, dtype=torch.int64, device=DEVICE),
                           torch.zeros(n, dtype=torch.int64, device=DEVICE))
    freq = torch.bincount(tokens, minlength=V).double() / n
    assert freq[4] == 0
    torch.testing.assert_close(freq, row.double().softmax(0), atol=0.03, rtol=0)


def _penalty_case(n: int, V: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, V, generator=gen) * 3
    table_rows = torch.tensor([2, -1, 0, 3, 2][:n], dtype=torch.int64)
    params = torch.tensor([[1.3, 0.5, 0.4], [2.0, 1.0, 1.0], [0.8, -0.7, -0.3], [1.0, 0.0, 0.9],
                           [1.1, 0.2, 0.0]][:n], dtype=torch.float32)
    mask = torch.rand(4, V, generator=gen) < 0.2
    counts = torch.randint(0, 3, (4, V), generator=gen, dtype=torch.int32) * (torch.rand(4, V, generator=gen) < 0.3)
    wide = torch.zeros(n, 8)  # params read through a row stride of 8
    wide[:, 2:5] = params
    return (logits.to(DEVICE), table_rows.to(DEVICE), wide[:, 2:].to(DEVICE), mask.to(DEVICE),
            counts.int().to(DEVICE))


@pytest.mark.parametrize("V", [37, 3000])
def test_penalties_match_reference(V):
    logits, rows, params, mask, counts = _penalty_case(5, V, V)
    ref = logits.clone()
    apply_penalties_reference(ref, rows, params, mask, counts)
    before = logits.clone()
    apply_penalties(logits, rows, params, mask, counts)
    torch.testing.assert_close(logits, ref, atol=1e-6, rtol=1e-6)
    assert torch.equal(logits[1], before[1])  # table row -1: untouched
    assert not torch.equal(logits[0], before[0])


def test_launchers_reject_bad_arguments():
    x = torch.zeros(2, 10, device=DEVICE)
    i64 = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="steps: 3 rows, logits has 2"):
        gumbel_argmax(x, i64, torch.zeros(3, dtype=torch.int64, device=DEVICE), i64)
    with pytest.raises(ValueError, match="seeds: dtype int32 not supported"):
        gumbel_argmax(x, i64.int(), i64, i64)
    with pytest.raises(ValueError, match=r"must both be \[\*, 10\]"):
        apply_penalties(x, i64, torch.zeros(2, 3, device=DEVICE), torch.zeros(1, 9, dtype=torch.bool, device=DEVICE),
                        torch.zeros(1, 9, dtype=torch.int32, device=DEVICE))


@pytest.mark.gpu
def test_gpu_real_vocabulary():
    V, n = 128256, 64
    seeds, steps = _rows(n, 9)
    assert torch.equal(uniform_noise(seeds, steps, V), uniform_noise_reference(seeds, steps, V))
    logits = (torch.randn(n, V, device="cuda") * 4).to(torch.bfloat16).float()  # bf16 logits: many ties
    greedy = (torch.arange(n, device="cuda") % 4 == 0).long()
    got = gumbel_argmax(logits, seeds, steps, greedy)
    ref = gumbel_argmax_reference(logits, seeds, steps, greedy)
    assert torch.equal(got[greedy == 1], logits.argmax(-1)[greedy == 1])
    # The GPU's log rounds differently from the reference's: only a near-tie could pick another token.
    assert (got != ref).sum() <= 1
    logits, rows, params, mask, counts = _penalty_case(5, V, 1)
    ref_l = logits.clone()
    apply_penalties_reference(ref_l, rows, params, mask, counts)
    apply_penalties(logits, rows, params, mask, counts)
    torch.testing.assert_close(logits, ref_l, atol=1e-5, rtol=1e-6)
