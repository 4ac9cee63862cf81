# The sampler as it was at commit 5fb562b (engine_svc/sampler.py), kept verbatim as the baseline of
# bench/sampler.py: per-row Python, a [rows, V] clone, int64 hash noise, up to three host syncs.
# Not used by the engine; do not import it outside bench/.
"""Batched sampling on the device: one pass over [num_rows, vocab] tensors, no per-row vocab loops.

Order of operations (transformers' order, so a plain HF-style reference reproduces it):

    raw fp32 logits
    -> repetition penalty (HF: prompt + output tokens; x/p where x > 0, x*p where x < 0)
    -> frequency / presence penalties (OpenAI: output tokens; x - f*count - p*[count > 0])
    -> min_tokens: stop ids (EOS unless ignore_eos, plus stop_token_ids) set to -inf
    -> / temperature (greedy rows: 1)
    => logprobs are taken HERE: log_softmax of these "processed" logits, before truncation, so
       top candidates always have finite logprobs. (vLLM's default is the raw model logprobs;
       we include penalties and temperature because they are what the request asked the
       distribution to be.)
    -> top-k (keep logits >= the k-th largest) -> top-p (drop the low tail whose mass <= 1 - p)
    -> min-p (drop p < min_p * max p)
    -> greedy rows: argmax; others: Gumbel-max with counter-based noise.

Randomness: the noise for vocabulary entry v of a row is a hash of (seed, number of tokens the
request has generated so far, v). A seeded request therefore draws the same token whatever the
batch around it, across runs, and after a preemption that recomputes it. Unseeded rows get a fresh
seed from the engine's generator every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine_svc.sampling_params import SamplingParams
from engine_svc.step import SampledToken

M32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """(x * c) mod 2^32 for x in [0, 2^32), exactly, without int64 overflow (works on ints and tensors)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & M32


def mix32(x):
    """A 32-bit integer permutation with good avalanche (Wellons' lowbias32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_keys(seed: int, step: int) -> tuple[int, int]:
    """Two 32-bit keys for the noise of one row: a function of (seed, step) only."""
    k1 = mix32(mix32((seed & M32) ^ 0x68BC21EB) ^ (step & M32))
    k2 = mix32(mix32(((seed >> 32) & M32) ^ k1) ^ 0x02E5BE93)
    return k1, k2


def uniform_noise(vocab_hash: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor) -> torch.Tensor:
    """vocab_hash [V] int64, k1/k2 [N] int64 -> uniforms in (0, 1), fp32 [N, V]."""
    h = mix32(mix32(vocab_hash[None, :] ^ k1[:, None]) ^ k2[:, None])
    return ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))


@dataclass(slots=True)
class SampleRequest:
    """What the sampler needs to know about one row."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]


def _padded(rows: list[list[int]], fill: int) -> np.ndarray:
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), max(width, 1)), fill, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


class Sampler:
    """Samples one token per row of logits. Stateless apart from the engine's generator."""

    noise_chunk_elems = 1 << 22  # rows of noise are made in chunks of about this many entries

    def __init__(self, vocab_size: int, device: torch.device, eos_token_ids: list[int], seed: int = 0):
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.eos_token_ids = list(eos_token_ids)
        self.generator = torch.Generator().manual_seed(seed)  # host: draws seeds for unseeded rows
        self.vocab_hash = mix32(torch.arange(vocab_size, dtype=torch.int64, device=self.device) ^ 0x5BD1E995)

    def __call__(self, logits: torch.Tensor, reqs: list[SampleRequest]) -> list[SampledToken]:
        """logits: [N, V] fp32 on the device, one row per request -> one SampledToken per row."""
        params = [r.params for r in reqs]
        n = len(reqs)
        if n == 0:
            return []
        greedy = [p.temperature == 0.0 for p in params]
        want_logprobs = any(p.logprobs or p.top_logprobs for p in params)
        needs_work = want_logprobs or not all(greedy) or any(
            p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty
            or len(r.output_token_ids) < p.min_tokens for p, r in zip(params, reqs))
        if not needs_work:  # the common all-greedy case: one argmax, one host copy
            return [SampledToken(t) for t in logits.argmax(dim=-1).tolist()]

        logits, logprobs = self.process(logits, reqs, want_logprobs)
        tokens = logits.argmax(dim=-1)
        rows = [i for i, g in enumerate(greedy) if not g]
        if rows:
            idx = torch.tensor(rows, device=self.device)
            tokens[idx] = self._draw(logits[idx], [reqs[i] for i in rows])
        return self._results(tokens, logprobs, params)

    def process(self, logits: torch.Tensor, reqs: list[SampleRequest],
                want_logprobs: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Apply everything but the draw (see the module docstring for the order).

        Returns (truncated logits [N, V] with -inf for removed tokens, logprobs [N, V] or None).
        Greedy rows are not truncated: truncation always keeps the argmax.
        """
        params = [r.params for r in reqs]
        logits = logits.float().clone()
        self._apply_penalties(logits, reqs)
        self._apply_min_tokens(logits, reqs)
        temps = [1.0 if p.temperature == 0.0 else p.temperature for p in params]
        logits.div_(torch.tensor(temps, device=self.device)[:, None])
        logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        if any(p.temperature != 0.0 for p in params):
            self._truncate(logits, params)
        return logits, logprobs

    def _apply_penalties(self, logits: torch.Tensor, reqs: list[SampleRequest]) -> None:
        V = self.vocab_size
        rep = [r.params.repetition_penalty for r in reqs]
        if any(p != 1.0 for p in rep):
            ids = _padded([r.prompt_token_ids + r.output_token_ids if p != 1.0 else []
                           for r, p in zip(reqs, rep)], V)
            seen = torch.zeros(len(reqs), V + 1, dtype=torch.bool, device=self.device)
            seen.scatter_(1, torch.from_numpy(ids).to(self.device), True)
            seen = seen[:, :V]
            pen = torch.tensor(rep, device=self.device)[:, None]
            penalised = torch.where(logits < 0, logits * pen, logits / pen)
            logits.copy_(torch.where(seen, penalised, logits))
        freq = [r.params.frequency_penalty for r in reqs]
        pres = [r.params.presence_penalty for r in reqs]
        if any(freq) or any(pres):
            ids = _padded([r.output_token_ids for r in reqs], V)
            counts = torch.zeros(len(reqs), V + 1, device=self.device)
            counts.scatter_add_(1, torch.from_numpy(ids).to(self.device), torch.ones(ids.shape, device=self.device))
            counts = counts[:, :V]
            f = torch.tensor(freq, device=self.device)[:, None]
            p = torch.tensor(pres, device=self.device)[:, None]
            logits.sub_(f * counts + p * (counts > 0).float())

    def _apply_min_tokens(self, logits: torch.Tensor, reqs: list[SampleRequest]) -> None:
        rows, cols = [], []
        for i, r in enumerate(reqs):
            p = r.params
            if len(r.output_token_ids) < p.min_tokens:
                stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_token_ids))
                rows += [i] * len(stops)
                cols += sorted(stops)
        if rows:
            logits[torch.tensor(rows, device=self.device), torch.tensor(cols, device=self.device)] = float("-inf")

    def _truncate(self, logits: torch.Tensor, params: list[SamplingParams]) -> None:
        V = self.vocab_size
        top_k = [p.top_k if 0 < p.top_k < V else 0 for p in params]
        if any(top_k):
            k = torch.tensor(top_k, device=self.device)
            kth = logits.topk(max(top_k), dim=-1).values.gather(1, (k - 1).clamp(min=0)[:, None])
            kth = torch.where(k[:, None] > 0, kth, torch.full_like(kth, float("-inf")))
            logits.masked_fill_(logits < kth, float("-inf"))
        if any(p.top_p < 1.0 for p in params):
            top_p = torch.tensor([p.top_p for p in params], device=self.device)
            sorted_logits, order = logits.sort(dim=-1)  # ascending
            cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            drop = cum <= (1.0 - top_p)[:, None]
            drop[:, -1] = False  # always keep the most likely token
            logits.masked_fill_(drop.scatter(1, order, drop), float("-inf"))
        if any(p.min_p > 0.0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=self.device)
            probs = logits.softmax(dim=-1)
            drop = probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True)
            logits.masked_fill_(drop, float("-inf"))

    def _draw(self, logits: torch.Tensor, reqs: list[SampleRequest]) -> torch.Tensor:
        """Gumbel-max: argmax(logits + Gumbel noise) samples softmax(logits). [n, V] -> [n].

        The noise is made in row chunks (noise_chunk_elems) to bound the int64 temporaries."""
        fresh = torch.randint(0, 2**62, (len(reqs),), generator=self.generator).tolist()
        keys = torch.tensor([row_keys(r.params.seed if r.params.seed is not None else s, len(r.output_token_ids))
                             for r, s in zip(reqs, fresh)], dtype=torch.int64, device=self.device)
        out = torch.empty(len(reqs), dtype=torch.int64, device=self.device)
        chunk = max(1, self.noise_chunk_elems // self.vocab_size)
        for start in range(0, len(reqs), chunk):
            k = keys[start:start + chunk]
            u = uniform_noise(self.vocab_hash, k[:, 0], k[:, 1])
            out[start:start + chunk] = torch.argmax(logits[start:start + chunk] - torch.log(-torch.log(u)), dim=-1)
        return out

    @staticmethod
    def _results(tokens: torch.Tensor, logprobs: torch.Tensor | None,
                 params: list[SamplingParams]) -> list[SampledToken]:
        token_list = tokens.tolist()
        if logprobs is None:
            return [SampledToken(t) for t in token_list]
        chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
        max_top = min(max(p.top_logprobs for p in params), logprobs.shape[-1])
        top_vals = top_ids = None
        if max_top:
            top = logprobs.topk(max_top, dim=-1)
            top_vals, top_ids = top.values.tolist(), top.indices.tolist()
        out = []
        for i, (t, p) in enumerate(zip(token_list, params)):
            if not (p.logprobs or p.top_logprobs):
                out.append(SampledToken(t))
                continue
            cands = None
            if p.top_logprobs:
                cands = list(zip(top_ids[i][:p.top_logprobs], top_vals[i][:p.top_logprobs]))
            out.append(SampledToken(t, chosen[i], cands))
        return out
