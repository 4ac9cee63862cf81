"""A launched step whose sampled tokens may still be on the device.

``ModelRunner.launch`` returns a PendingStep at once; ``result()`` waits for the step's one
device-to-host copy and returns the SampledTokens aligned with the plan's req_ids. The next step
does not wait for it: its decode inputs take ``token_ids`` (on the device) directly.

Sampling goes through ``Sampler.sample(logits, reqs) -> PendingSample`` where the sampler offers it.
Until then `sample_async` adapts the synchronous ``Sampler.__call__``: plain greedy batches (no
logprobs, penalties or min_tokens) take one argmax and one non-blocking copy into pinned memory;
every other batch samples synchronously (it waits for the step) and hands back finished results.
"""

from __future__ import annotations

from typing import Callable

import torch

from engine_svc.step import SampledToken


class _ArgmaxPending:
    """Greedy tokens on the device, copied to pinned host memory without blocking."""

    def __init__(self, logits: torch.Tensor, host: torch.Tensor | None):
        self.token_ids = logits.argmax(dim=-1)
        self._n = self.token_ids.shape[0]
        if host is None:  # CPU: nothing is asynchronous
            self._host, self._event = self.token_ids, None
        else:
            self._host = host[:self._n]
            self._host.copy_(self.token_ids, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()

    def result(self) -> list[SampledToken]:
        if self._event is not None:
            self._event.synchronize()
        return [SampledToken(t) for t in self._host.tolist()]


class _DonePending:
    """Tokens sampled synchronously: the results exist already."""

    def __init__(self, results: list[SampledToken], device: torch.device):
        self._results = results
        self.token_ids = torch.tensor([r.token_id for r in results], dtype=torch.int64, device=device)

    def result(self) -> list[SampledToken]:
        return self._results


def sample_async(sampler, logits: torch.Tensor, make_reqs: Callable[[], list], plain_greedy: bool,
                 host: torch.Tensor | None):
    """Sample one token per row of logits; returns an object with .token_ids and .result().

    make_reqs builds the SampleRequests (only called where a sampler needs them); host is a pinned
    int64 buffer for the greedy copy (None on CPU)."""
    sample = getattr(sampler, "sample", None)
    if sample is not None:
        return sample(logits, make_reqs())
    if plain_greedy:
        return _ArgmaxPending(logits, host)
    return _DonePending(sampler(logits, make_reqs()), logits.device)


class PendingStep:
    """One launched step. Built by ModelRunner.launch, read by the engine core (result())."""

    def __init__(self, num_reqs: int, positions: list[int], pending, on_done: Callable[[list[int]], None]):
        self._num_reqs, self._positions = num_reqs, positions
        self._pending, self._on_done = pending, on_done
        self._results: list[SampledToken | None] | None = None

    @property
    def token_ids(self) -> torch.Tensor | None:
        """The step's sampled ids on the device, in sampled-row order (None: nothing sampled)."""
        return None if self._pending is None else self._pending.token_ids

    @property
    def done(self) -> bool:
        return self._results is not None

    def result(self) -> list[SampledToken | None]:
        """Wait for the step's tokens; aligned with the plan's req_ids (None where not sampled)."""
        if self._results is None:
            out: list[SampledToken | None] = [None] * self._num_reqs
            if self._pending is not None:
                sampled = self._pending.result()
                for i, tok in zip(self._positions, sampled):
                    out[i] = tok
                self._on_done([t.token_id for t in sampled])
            else:
                self._on_done([])
            self._results = out
        return self._results
