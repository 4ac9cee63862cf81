"""The batched sampler against a plain per-row, per-token Python reference on a small vocabulary."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from engine_svc.sampler import SampleRequest, Sampler, mix32
from engine_svc.sampling_params import SamplingParams

V = 32
EOS = [2, 5]


def reference(logits: list[float], req: SampleRequest, eos: list[int]) -> tuple[list[float], set[int]]:
    """Plain Python, one token at a time: (log-probs after penalties/min_tokens/temperature, kept ids)."""
    p = req.params
    x = list(logits)
    if p.repetition_penalty != 1.0:
        for t in set(req.prompt_token_ids) | set(req.output_token_ids):
            x[t] = x[t] * p.repetition_penalty if x[t] < 0 else x[t] / p.repetition_penalty
    for t in set(req.output_token_ids):
        x[t] -= p.frequency_penalty * req.output_token_ids.count(t) + p.presence_penalty
    if len(req.output_token_ids) < p.min_tokens:
        for t in set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos)):
            x[t] = -math.inf
    temp = p.temperature or 1.0
    x = [v / temp for v in x]
    m = max(x)
    log_z = m + math.log(sum(math.exp(v - m) for v in x))
    logprobs = [v - log_z for v in x]
    kept = {t for t in range(len(x)) if x[t] > -math.inf}
    if p.temperature == 0.0:
        return logprobs, kept
    if p.top_k:
        kth = sorted((x[t] for t in kept), reverse=True)[min(p.top_k, len(kept)) - 1]
        kept = {t for t in kept if x[t] >= kth}
    if p.top_p < 1.0:  # nucleus: walk down from the most likely, keep while the mass before < p
        z = sum(math.exp(x[t] - m) for t in kept)
        mass, nucleus = 0.0, set()
        for t in sorted(kept, key=lambda t: -x[t]):
            if mass >= p.top_p - 1e-9:
                break
            nucleus.add(t)
            mass += math.exp(x[t] - m) / z
        kept = nucleus
    if p.min_p > 0.0:
        best = max(x[t] for t in kept)
        kept = {t for t in kept if math.exp(x[t] - best) >= p.min_p}
    return logprobs, kept


def random_params(rng: random.Random) -> SamplingParams:
    return SamplingParams(
        temperature=rng.choice([0.0, 0.5, 1.0, 1.7]),
        top_k=rng.choice([0, 1, 3, 10]),
        top_p=rng.choice([1.0, 0.9, 0.5, 0.2]),
        min_p=rng.choice([0.0, 0.05, 0.3]),
        repetition_penalty=rng.choice([1.0, 1.3, 0.8]),
        presence_penalty=rng.choice([0.0, 0.5, -0.7]),
        frequency_penalty=rng.choice([0.0, 0.4, -0.3]),
        min_tokens=rng.choice([0, 0, 3]),
        ignore_eos=rng.random() < 0.3,
        stop_token_ids=rng.choice([[], [7]]),
        seed=rng.randrange(2**63),
        logprobs=True,
        top_logprobs=rng.choice([0, 1, 5]),
    )


def random_batch(n: int, seed: int) -> tuple[torch.Tensor, list[SampleRequest]]:
    rng = random.Random(seed)
    logits = torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3
    reqs = [SampleRequest(f"r{i}", random_params(rng), [rng.randrange(V) for _ in range(rng.randrange(1, 8))],
                          [rng.randrange(V) for _ in range(rng.randrange(0, 6))]) for i in range(n)]
    return logits, reqs


@pytest.mark.parametrize("seed", range(6))
def test_processing_matches_reference(seed):
    logits, reqs = random_batch(64, seed)
    _check_processing(Sampler(V, "cpu", EOS), logits, reqs)


@pytest.mark.parametrize("seed", range(4))
def test_top_p_within_top_k_matches_reference_without_a_sort(seed):
    """When every top-p row also has a top-k, the nucleus is found in the top-k list."""
    logits, reqs = random_batch(64, 50 + seed)
    rng = random.Random(seed)
    for r in reqs:
        if r.params.top_p < 1.0:
            r.params.top_k = rng.choice([1, 3, 10, 20])
    sampler = Sampler(V, "cpu", EOS)
    _check_processing(sampler, logits, reqs)
    view = sampler.states.view
    assert view.any_top_p_in_top_k and view.top_p_sort_rows is None


def _check_processing(sampler, logits, reqs):
    truncated, logprobs = sampler.process(logits, reqs)
    for i, req in enumerate(reqs):
        ref_lp, ref_kept = reference(logits[i].tolist(), req, EOS)
        ref = torch.tensor(ref_lp)
        finite = ref > -math.inf
        assert torch.equal(logprobs[i] > -math.inf, finite)
        torch.testing.assert_close(logprobs[i][finite], ref[finite], atol=1e-5, rtol=0)
        kept = set(torch.nonzero(truncated[i] > -math.inf).flatten().tolist())
        if req.params.temperature == 0.0:
            assert int(truncated[i].argmax()) == max(ref_kept, key=lambda t: ref_lp[t])
        else:
            assert kept == ref_kept, (i, req.params)


@pytest.mark.parametrize("seed", range(3))
def test_results_tokens_and_logprobs(seed):
    logits, reqs = random_batch(64, 100 + seed)
    out = Sampler(V, "cpu", EOS)(logits.clone(), reqs)  # the sampler consumes its logits
    for i, (req, tok) in enumerate(zip(reqs, out)):
        ref_lp, ref_kept = reference(logits[i].tolist(), req, EOS)
        assert tok.token_id in ref_kept
        if req.params.temperature == 0.0:
            assert tok.token_id == max(range(V), key=lambda t: ref_lp[t])
        assert tok.logprob == pytest.approx(ref_lp[tok.token_id], abs=1e-5)
        k = req.params.top_logprobs
        if k == 0:
            assert tok.top_logprobs is None
        else:
            best = sorted(range(V), key=lambda t: -ref_lp[t])[:k]
            assert [t for t, _ in tok.top_logprobs] == best
            assert [lp for _, lp in tok.top_logprobs] == pytest.approx([ref_lp[t] for t in best], abs=1e-5)


def test_all_greedy_fast_path_is_argmax():
    logits = torch.randn(9, V, generator=torch.Generator().manual_seed(3))
    reqs = [SampleRequest(f"r{i}", SamplingParams(temperature=0.0), [1], []) for i in range(9)]
    out = Sampler(V, "cpu", EOS)(logits.clone(), reqs)
    assert [t.token_id for t in out] == logits.argmax(-1).tolist()
    assert all(t.logprob is None and t.top_logprobs is None for t in out)


def test_min_tokens_suppresses_stops_until_reached():
    logits = torch.zeros(4, V)
    logits[:, 2] = 10.0  # EOS is by far the best
    logits[:, 7] = 9.0
    mk = lambda **kw: SamplingParams(temperature=0.0, min_tokens=2, **kw)  # noqa: E731
    reqs = [SampleRequest("a", mk(), [1], [9]),  # 1 < 2 generated: EOS suppressed
            SampleRequest("b", mk(), [1], [9, 9]),  # reached: EOS allowed
            SampleRequest("c", mk(ignore_eos=True), [1], [9]),  # EOS does not stop, so it is not suppressed
            SampleRequest("d", mk(stop_token_ids=[7]), [1], [])]  # stop ids and EOS (2, 5) suppressed
    out = [t.token_id for t in Sampler(V, "cpu", EOS)(logits, reqs)]
    assert out[0] == 7 and out[1] == 2 and out[2] == 2 and out[3] not in (2, 5, 7)


_ids = itertools.count()


def _draw(sampler, logits_row, params, num_generated, others=()):
    """Sample one row with `params` at step `num_generated` (a new request), placed among other rows."""
    rows = [logits_row] + [o[0] for o in others]
    reqs = [SampleRequest(f"draw{next(_ids)}", params, [1], [0] * num_generated)] + [o[1] for o in others]
    return sampler(torch.stack(rows), reqs)[0].token_id


def test_seeded_reproducible_across_runs_and_batch_compositions():
    gen = torch.Generator().manual_seed(5)
    row = torch.randn(V, generator=gen)
    params = SamplingParams(temperature=1.0, seed=1234)
    alone = [_draw(Sampler(V, "cpu", EOS, seed=1), row, params, n) for n in range(40)]
    rng = random.Random(0)
    for n in range(40):
        others = [(torch.randn(V, generator=gen),
                   SampleRequest(f"other{next(_ids)}", random_params(rng), [3], [4] * rng.randrange(5)))
                  for _ in range(rng.randrange(1, 6))]
        assert _draw(Sampler(V, "cpu", EOS, seed=99), row, params, n, others) == alone[n]
    assert len(set(alone)) > 5  # the draws vary with the step
    other_seed = [_draw(Sampler(V, "cpu", EOS), row, SamplingParams(seed=4321), n) for n in range(40)]
    assert other_seed != alone


def test_unseeded_rows_follow_the_engine_generator():
    row = torch.randn(V, generator=torch.Generator().manual_seed(6))
    a, b, c = Sampler(V, "cpu", EOS, seed=7), Sampler(V, "cpu", EOS, seed=7), Sampler(V, "cpu", EOS, seed=8)
    pa = [_draw(a, row, SamplingParams(), 0) for _ in range(30)]
    assert pa == [_draw(b, row, SamplingParams(), 0) for _ in range(30)]
    assert pa != [_draw(c, row, SamplingParams(), 0) for _ in range(30)]
    assert len(set(pa)) > 3  # same step, fresh noise each call


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.7),
                                    SamplingParams(temperature=1.3, top_k=5, top_p=0.8)])
def test_draws_follow_the_processed_distribution(params):
    """Chi-square of 8000 seeded draws against the reference's renormalised kept distribution."""
    row = torch.randn(V, generator=torch.Generator().manual_seed(11)) * 2
    n = 8000
    sampler = Sampler(V, "cpu", EOS)
    reqs = [SampleRequest(f"r{s}", SamplingParams(**{**_fields(params), "seed": s}), [1], []) for s in range(n)]
    counts = torch.bincount(torch.tensor([t.token_id for t in sampler(row.expand(n, V), reqs)]), minlength=V)
    ref_lp, kept = reference(row.tolist(), reqs[0], EOS)
    z = sum(math.exp(ref_lp[t]) for t in kept)
    probs = [math.exp(ref_lp[t]) / z if t in kept else 0.0 for t in range(V)]
    assert all(counts[t] == 0 for t in range(V) if t not in kept)
    chi2 = sum((counts[t].item() - n * probs[t]) ** 2 / (n * probs[t]) for t in kept if n * probs[t] > 5)
    dof = sum(1 for t in kept if n * probs[t] > 5) - 1
    assert chi2 < dof + 6 * math.sqrt(2 * dof) + 10, (chi2, dof)


def _fields(p: SamplingParams) -> dict:
    return {f: getattr(p, f) for f in SamplingParams.__slots__}


def test_mix32_matches_python_reference_and_is_a_bijection_sample():
    def ref(x):  # Wellons' lowbias32 with explicit 32-bit wraparound
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)
    xs = [0, 1, 2, 0xFFFFFFFF, 0x80000000, 123456789] + random.Random(1).sample(range(2**32), 200)
    got = mix32(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert got == [ref(x) for x in xs] == [mix32(x) for x in xs]
    assert len(set(got)) == len(xs)


def test_noise_chunking_and_greedy_rows_do_not_change_draws():
    logits, reqs = random_batch(40, 77)
    whole = Sampler(V, "cpu", EOS)(logits.clone(), reqs)
    chunked = Sampler(V, "cpu", EOS)
    chunked.noise_chunk_elems = 3 * V  # 3 rows per chunk
    assert [t.token_id for t in chunked(logits.clone(), reqs)] == [t.token_id for t in whole]
    sampled_only = [i for i, r in enumerate(reqs) if r.params.temperature > 0]
    alone = Sampler(V, "cpu", EOS)(logits[sampled_only], [reqs[i] for i in sampled_only])
    assert [t.token_id for t in alone] == [whole[i].token_id for i in sampled_only]


def test_top_logprobs_capped_by_a_small_vocabulary():
    logits = torch.randn(2, 8, generator=torch.Generator().manual_seed(2))
    reqs = [SampleRequest(f"r{i}", SamplingParams(temperature=0.0, top_logprobs=20), [1], []) for i in range(2)]
    out = Sampler(8, "cpu", EOS)(logits, reqs)
    assert [len(t.top_logprobs) for t in out] == [8, 8]
    assert sorted(t for t, _ in out[0].top_logprobs) == list(range(8))


# ---- persistent per-request state ----

# On CUDA the sampler runs the Triton kernels: `pytest -m gpu` repeats these tests there.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]

def _stateful_params(rng: random.Random) -> SamplingParams:
    p = random_params(rng)
    p.top_logprobs = rng.choice([0, 2])
    return p


def _same(a, b):
    assert [t.token_id for t in a] == [t.token_id for t in b]
    for x, y in zip(a, b):
        assert (x.logprob is None) == (y.logprob is None)
        if x.logprob is not None:
            assert x.logprob == pytest.approx(y.logprob, abs=1e-5)
        assert (x.top_logprobs is None) == (y.top_logprobs is None)
        if x.top_logprobs:
            assert [t for t, _ in x.top_logprobs] == [t for t, _ in y.top_logprobs]


@pytest.mark.parametrize("device", DEVICES)
def test_state_persists_across_calls_as_rows_join_leave_and_reorder(device):
    """A long-lived sampler (state uploaded once, advanced on the device) against a fresh sampler
    per call (state rebuilt from the full histories every time): same tokens, same logprobs."""
    rng = random.Random(21)
    pool = [SampleRequest(f"q{i}", _stateful_params(rng), [rng.randrange(V) for _ in range(rng.randrange(1, 6))], [])
            for i in range(10)]
    live = Sampler(V, device, EOS, seed=3)
    gen = torch.Generator().manual_seed(21)
    for call in range(14):
        rows = rng.sample(pool, rng.randrange(1, 8)) if call % 3 else pool[:4]  # repeats and changes
        logits = (torch.randn(len(rows), V, generator=gen) * 3).to(device)
        got = live(logits.clone(), rows)
        _same(got, Sampler(V, device, EOS)(logits, rows))
        for r, t in zip(rows, got):
            r.output_token_ids.append(t.token_id)
    assert sum(len(r.output_token_ids) for r in pool) >= 40


def test_known_rows_read_only_the_number_of_output_tokens():
    rng = random.Random(4)
    reqs = [SampleRequest(f"k{i}", _stateful_params(rng), [1, 2, 3], [4, 4]) for i in range(5)]
    a, b = Sampler(V, "cpu", EOS), Sampler(V, "cpu", EOS)
    gen = torch.Generator().manual_seed(4)
    for _ in range(4):
        logits = torch.randn(5, V, generator=gen) * 3
        ta = a(logits.clone(), reqs)
        # b's rows carry placeholders where the last token goes (as under overlap): same draws
        blind = [SampleRequest(r.request_id, r.params, r.prompt_token_ids, r.output_token_ids[:-1] + [0]
                               if len(r.output_token_ids) > 2 else r.output_token_ids) for r in reqs]
        _same(b(logits, blind), ta)
        for r, t in zip(reqs, ta):
            r.output_token_ids.append(t.token_id)


def test_forget_and_reused_ids_rebuild_state():
    params = SamplingParams(temperature=1.0, seed=9, frequency_penalty=1.5, min_tokens=1)
    row = torch.randn(1, V, generator=torch.Generator().manual_seed(8)) * 2
    s = Sampler(V, "cpu", EOS)
    first = [s(row.clone(), [SampleRequest("x", params, [1], [0] * n)])[0].token_id for n in range(3)]
    assert "x" in s.states.slot_of
    free = len(s.states.free_slots)
    s.forget(["x", "never-seen"])
    assert "x" not in s.states.slot_of and len(s.states.free_slots) == free + 1
    # The same id and params object again from the start (a new request): the same draws as the first time
    again = [s(row.clone(), [SampleRequest("x", params, [1], [0] * n)])[0].token_id for n in range(3)]
    assert again == first
    # ... and without forget(): the output count gives the reuse away
    assert [s(row.clone(), [SampleRequest("x", params, [1], [0] * n)])[0].token_id for n in range(3)] == first


def test_request_dropped_for_room_rejoins_with_the_same_draws():
    """Preemption: a request leaves the batch, its slot goes to others, it returns with its histories."""
    p = SamplingParams(temperature=0.8, seed=77, repetition_penalty=1.4, top_k=10)
    gen = torch.Generator().manual_seed(77)
    logits = [torch.randn(1, V, generator=gen) * 3 for _ in range(8)]
    steady = Sampler(V, "cpu", EOS)
    out: list[int] = []
    for i in range(8):
        out.append(steady(logits[i].clone(), [SampleRequest("p", p, [3, 4], list(out))])[0].token_id)
    s = Sampler(V, "cpu", EOS)
    hist: list[int] = []
    for i in range(8):
        if i == 4:  # others take every slot meanwhile: "p" is dropped (least recently used)
            n = s.states.capacity + 1
            crowd = [SampleRequest(f"c{j}", SamplingParams(seed=j), [1], []) for j in range(n)]
            s(torch.randn(n, V), crowd)
            assert "p" not in s.states.slot_of
        hist.append(s(logits[i].clone(), [SampleRequest("p", p, [3, 4], list(hist))])[0].token_id)
    assert hist == out


@pytest.mark.parametrize("device", DEVICES)
def test_pending_sample_equals_the_sync_result_and_may_overlap(device):
    rng = random.Random(12)
    reqs = [SampleRequest(f"o{i}", _stateful_params(rng), [1, 2], []) for i in range(6)]
    sync, lazy = Sampler(V, device, EOS, seed=5), Sampler(V, device, EOS, seed=5)
    gen = torch.Generator().manual_seed(12)
    steps = [(torch.randn(6, V, generator=gen) * 3).to(device) for _ in range(5)]
    hist = [[] for _ in reqs]
    expected = []
    for x in steps:
        rows = [SampleRequest(r.request_id, r.params, r.prompt_token_ids, h) for r, h in zip(reqs, hist)]
        out = sync(x.clone(), rows)
        expected.append(out)
        for h, t in zip(hist, out):
            h.append(t.token_id)
    pending = []
    for i, x in enumerate(steps):  # each step is launched before the previous result is read
        rows = [SampleRequest(r.request_id, r.params, r.prompt_token_ids, [-1] * i) for r in reqs]
        pending.append(lazy.sample(x.clone(), rows))
    for p, out in zip(pending, expected):
        assert p.token_ids.dtype == torch.int64 and p.token_ids.tolist() == [t.token_id for t in out]
        _same(p.result(), out)
        assert p.result() is p.result()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [1e-38, 1e-30, 9.9e-6])
def test_tiny_temperatures_are_greedy_with_finite_logprobs(temperature, device):
    logits = (torch.randn(3, V, generator=torch.Generator().manual_seed(15)) * 3).to(device)
    greedy = Sampler(V, device, EOS)(logits.clone(), [SampleRequest(f"g{i}", SamplingParams(
        temperature=0.0, logprobs=True, top_logprobs=3), [1], []) for i in range(3)])
    tiny = Sampler(V, device, EOS)(logits.clone(), [SampleRequest(f"t{i}", SamplingParams(
        temperature=temperature, top_p=0.5, logprobs=True, top_logprobs=3), [1], []) for i in range(3)])
    assert all(math.isfinite(t.logprob) and all(math.isfinite(lp) for _, lp in t.top_logprobs) for t in tiny)
    _same(tiny, greedy)
    assert [t.token_id for t in tiny] == logits.argmax(-1).tolist()
    assert SamplingParams(temperature=temperature).greedy


def test_temperature_at_the_greedy_bound_still_samples_sharply():
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(16)) * 3
    out = Sampler(V, "cpu", EOS)(logits.clone(), [SampleRequest(f"b{i}", SamplingParams(
        temperature=1e-5, logprobs=True, top_logprobs=2), [1], []) for i in range(2)])
    assert [t.token_id for t in out] == logits.argmax(-1).tolist()
    for t, row in zip(out, logits):
        ref = torch.log_softmax(row.double() / 1e-5, -1)  # the sharp distribution, not temperature 1
        assert t.logprob == pytest.approx(0.0, abs=1e-6) and math.isfinite(t.top_logprobs[1][1])
        assert t.top_logprobs[1][1] == pytest.approx(float(ref.topk(2).values[1]), rel=1e-4)
    assert not SamplingParams(temperature=1e-5).greedy


def test_a_rows_truncation_does_not_depend_on_the_other_rows():
    """top-p takes the top-k path or the sort path by the row's own parameters, never the batch's."""
    gen = torch.Generator().manual_seed(31)
    row = torch.randn(1, V, generator=gen) * 3
    mine = SampleRequest("me", SamplingParams(temperature=0.9, top_p=0.8, top_k=6, seed=3), [1], [])
    alone, _ = Sampler(V, "cpu", EOS).process(row, [mine])
    others = [SampleRequest(f"o{i}", SamplingParams(top_p=0.7, top_k=k), [1], []) for i, k in enumerate([0, 0, 9])]
    mixed, _ = Sampler(V, "cpu", EOS).process(torch.cat([row, torch.randn(3, V, generator=gen)]), [mine] + others)
    assert torch.equal(mixed[0], alone[0])


def test_a_repeated_batch_joins_and_gathers_nothing(monkeypatch):
    """The steady decode path: the same rows again (one more output token each) reuse the view."""
    rng = random.Random(8)
    reqs = [SampleRequest(f"s{i}", _stateful_params(rng), [1, 2], [3]) for i in range(5)]
    s = Sampler(V, "cpu", EOS)
    gen = torch.Generator().manual_seed(8)
    _append_tokens(reqs, s(torch.randn(5, V, generator=gen), reqs))
    view = s.states.view

    def fail(*args):
        raise AssertionError("per-row work on a repeated batch")
    monkeypatch.setattr(s.states, "_join", fail)
    monkeypatch.setattr(s.states, "_gather", fail)
    for _ in range(3):
        _append_tokens(reqs, s(torch.randn(5, V, generator=gen), reqs))
    assert s.states.view is view
    with pytest.raises(AssertionError, match="per-row work"):  # a changed batch does join
        s(torch.randn(5, V, generator=gen), reqs[1:] + [SampleRequest("new", SamplingParams(), [1], [])])


def _append_tokens(reqs, out):
    for r, t in zip(reqs, out):
        r.output_token_ids.append(t.token_id)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_row_parameters_handed_to_kernels_start_16_byte_aligned(n):
    """Triton specialises pointers on 16-byte alignment: a one-row batch once handed gumbel_argmax a
    view 8 bytes into the parameter table and compiled a new variant while serving."""
    _, reqs = random_batch(n, seed=n)
    view = Sampler(V, "cpu", EOS).states.prepare(reqs)
    for name in ("seeds", "greedy", "top_k", "min_tokens", "table_rows"):
        t = getattr(view, name)
        assert t.shape == (n,) and t.data_ptr() % 16 == 0, (name, t.data_ptr() % 16)
