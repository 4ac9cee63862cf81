"""Batched sampling on the device: per-request state persists on the device, every step is vectorised.

Contract:

    sampler = Sampler(vocab_size, device, eos_token_ids, seed)
    pending = sampler.sample(logits, reqs)   # launches everything and one non-blocking D2H copy
    pending.token_ids                        # device int64 [rows]: feed the next step without a sync
    pending.result() -> list[SampledToken]   # waits for that copy only
    sampler(logits, reqs)                    # == sampler.sample(logits, reqs).result()
    sampler.forget(request_ids)              # drop finished requests' state now

- ``logits`` is ``[rows, vocab_size]``, one row per SampleRequest, and is CONSUMED: the sampler works
  on it in place (it is the model's scratch output); pass a clone to keep it. Non-fp32 or
  non-contiguous logits are converted first (one copy).
- State per request id (engine_svc/sampling/state.py): parameters, seed, step counter and penalty
  histories are uploaded once when a request joins, from its SampleRequest (prompt and output token
  ids), and then advanced on the device with the tokens this sampler sampled; the token ids of later
  SampleRequests are not read, only their number: len(output_token_ids) must count every token
  sampled for the request so far (under overlap the newest may be a placeholder). A row whose count
  or params object differs from the sampler's is rebuilt from its histories (a new request under a
  reused id, or a history the engine changed).
- Rows absent from a call stay until their slot is needed (least recently used first) or forget();
  a request that returns after being dropped (e.g. preempted, then recomputed) is rebuilt from its
  histories, which must then be complete, and continues with the same draws.
- Per call on the steady path (same rows as the last call): three C-level passes over the rows
  (ids, params, lengths) and their comparison, then only device work; per-row Python runs when
  rows join or leave, and in result() to build the SampledTokens.

Order of operations (transformers' order, so a plain HF-style reference reproduces it):

    raw fp32 logits
    -> repetition penalty (HF: prompt + output tokens; x/p where x > 0, x*p where x < 0)
    -> frequency / presence penalties (OpenAI: output tokens; x - (f*count + p*[count > 0]))
    -> min_tokens: stop ids (EOS unless ignore_eos, plus stop_token_ids) set to -inf
    -> / temperature (greedy rows: 1; temperatures below MIN_TEMPERATURE = 1e-5 are greedy)
    => logprobs are taken HERE: log_softmax of these "processed" logits, before truncation, so
       top candidates always have finite logprobs. (vLLM's default is the raw model logprobs;
       we include penalties and temperature because they are what the request asked the
       distribution to be.)
    -> top-k (keep logits >= the k-th largest) -> top-p (drop the low tail whose mass <= 1 - p)
    -> min-p (drop p < min_p * max p)
    -> greedy rows: argmax; others: Gumbel-max with counter-based noise.

Randomness: the noise for vocabulary entry v of a row is a hash of (seed, number of tokens the
request has generated so far, v) (kernels/sampling.py). A seeded request therefore draws the same
token whatever the batch around it, across runs, and after a preemption that recomputes it. An
unseeded request gets a seed from the engine's generator when it joins. On CUDA the noise, the
argmax and the penalties are Triton kernels; on the CPU the same maths in PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine_svc.sampling import processing
from engine_svc.sampling.state import BatchView, RequestStates
from engine_svc.sampling_params import SamplingParams
from engine_svc.step import SampledToken
from kernels.sampling import mix32, vocab_hash

__all__ = ["PendingSample", "SampleRequest", "Sampler", "mix32"]


@dataclass(slots=True)
class SampleRequest:
    """What the sampler needs to know about one row."""

    request_id: str  # the key of the row's persistent state
    params: SamplingParams
    prompt_token_ids: list[int]  # read when the request joins (repetition penalty)
    output_token_ids: list[int]  # read when the request joins (penalties, min_tokens, the RNG step)


class PendingSample:
    """One call's tokens: on the device now, on the host once the single copy has landed."""

    def __init__(self, token_ids: torch.Tensor, payload: torch.Tensor, view: BatchView | None):
        self.token_ids = token_ids  # device int64 [rows]
        self._view = view
        self._results: list[SampledToken] | None = None
        self._event = None
        if payload.device.type == "cuda":
            self._host = torch.empty(payload.shape, dtype=payload.dtype, pin_memory=True)
            self._host.copy_(payload, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = payload

    def result(self) -> list[SampledToken]:
        """Wait for the copy and decode it: one SampledToken per row, in row order."""
        if self._results is None:
            if self._event is not None:
                self._event.synchronize()
            self._results = self._decode(self._host.tolist())
        return self._results

    def _decode(self, rows: list) -> list[SampledToken]:
        view = self._view
        if view is None or not view.any_logprobs:  # payload: the token ids alone
            return [SampledToken(t) for t in rows]
        k_max = view.max_top_logprobs
        out = []
        for row, want, k in zip(rows, view.want_logprobs, view.top_logprobs):
            token = int(row[0])
            if not want:
                out.append(SampledToken(token))
                continue
            cands = None
            if k:
                k = min(k, k_max)
                cands = [(int(t), lp) for t, lp in zip(row[2:2 + k], row[2 + k_max:2 + k_max + k])]
            out.append(SampledToken(token, row[1], cands))
        return out


class Sampler:
    """Samples one token per row of logits; keeps each request's sampling state on the device."""

    noise_chunk_elems = 1 << 22  # CPU path: noise is made in row chunks of about this many entries

    def __init__(self, vocab_size: int, device: torch.device, eos_token_ids: list[int], seed: int = 0):
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.eos_token_ids = list(eos_token_ids)
        self.generator = torch.Generator().manual_seed(seed)  # host: seeds for unseeded requests
        self.states = RequestStates(vocab_size, self.device, self.eos_token_ids, self.generator)
        self.use_triton = self.device.type == "cuda"
        self._vhash = None if self.use_triton else vocab_hash(vocab_size, self.device)

    def __call__(self, logits: torch.Tensor, reqs: list[SampleRequest]) -> list[SampledToken]:
        """logits: [N, V] on the device (consumed), one row per request -> one SampledToken per row."""
        return self.sample(logits, reqs).result()

    def forget(self, request_ids) -> None:
        """Drop these requests' state (finished or aborted); unknown ids are ignored."""
        self.states.forget(request_ids)

    def sample(self, logits: torch.Tensor, reqs: list[SampleRequest]) -> PendingSample:
        """Launch the whole sampling of one step and the copy of its results; do not wait."""
        if not reqs:
            return PendingSample(torch.empty(0, dtype=torch.int64, device=self.device),
                                 torch.empty(0, dtype=torch.int64), None)
        view = self.states.prepare(reqs)
        x = self._working_logits(logits, len(reqs))
        want_logprobs = view.any_logprobs
        min_tokens = self.states.min_tokens_active(view)
        if view.all_greedy and not (want_logprobs or view.any_penalty or min_tokens):
            tokens = x.argmax(dim=-1)  # the common all-greedy case
            self.states.advance(view, tokens)
            return PendingSample(tokens, tokens, view)
        steps = self.states.steps(view)
        self._process(x, view, steps, min_tokens)
        if want_logprobs:
            lse = torch.logsumexp(x, dim=-1)
            top = x.topk(view.max_top_logprobs, dim=-1) if view.max_top_logprobs else None
        if not view.all_greedy:
            processing.truncate(x, view)
        tokens = processing.draw(x, view, steps, self.use_triton, self.noise_chunk_elems, self._vhash)
        self.states.advance(view, tokens)
        if not want_logprobs:
            return PendingSample(tokens, tokens, view)
        chosen = x.gather(1, tokens[:, None]) - lse[:, None]  # truncation keeps the chosen token
        parts = [tokens[:, None].double(), chosen.double()]
        if top is not None:
            parts += [top.indices.double(), (top.values - lse[:, None]).double()]
        return PendingSample(tokens, torch.cat(parts, dim=1), view)

    def process(self, logits: torch.Tensor, reqs: list[SampleRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything but the draw, on a copy, without advancing any state (for tests and tools).

        Returns (truncated logits [N, V] with -inf for removed tokens, logprobs [N, V]).
        Greedy rows are not truncated: truncation always keeps the argmax.
        """
        view = self.states.prepare(reqs)
        x = logits.float().clone()
        self._process(x, view, self.states.steps(view), self.states.min_tokens_active(view))
        logprobs = torch.log_softmax(x, dim=-1)
        if not view.all_greedy:
            processing.truncate(x, view)
        return x, logprobs

    def _working_logits(self, logits: torch.Tensor, rows: int) -> torch.Tensor:
        if logits.shape != (rows, self.vocab_size):
            raise ValueError(f"logits: expected [{rows}, {self.vocab_size}], got {list(logits.shape)}")
        if logits.dtype == torch.float32 and logits.is_contiguous():
            return logits
        return logits.float().contiguous()

    def _process(self, x: torch.Tensor, view: BatchView, steps: torch.Tensor, min_tokens: bool) -> None:
        if view.any_penalty:
            processing.penalize(x, view, self.states, self.use_triton)
        if min_tokens:
            processing.suppress_stops(x, view, steps)
        if view.any_temperature:
            processing.divide_by_temperature(x, view)
