"""Sampling parameters: a validated value object. Greedy is temperature 0.

Built from the wire's `kvmesh.v1.SamplingParams` by the service (absent fields take the defaults
below) and read by the scheduler (max/min tokens, stop ids) and the sampler (everything else).
Imports no torch: the scheduler and request modules use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class SamplingParamsError(ValueError):
    """A sampling value is out of range. ``field`` names the offending field for the gRPC error."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


MAX_TOP_LOGPROBS = 20
# Temperatures below this sample greedily (as vLLM's _SAMPLING_EPS): logits / 1e-38 overflow to inf.
MIN_TEMPERATURE = 1e-5
MAX_STOP_TOKEN_IDS = 64


@dataclass(slots=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy (so is anything below MIN_TEMPERATURE)
    top_p: float = 1.0  # (0, 1]; 1 = off
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # [0, 1]; 0 = off
    repetition_penalty: float = 1.0  # > 0; 1 = off (HF semantics: prompt and output tokens)
    presence_penalty: float = 0.0  # [-2, 2]; output tokens only (OpenAI semantics)
    frequency_penalty: float = 0.0  # [-2, 2]; output tokens only
    seed: int | None = None  # per-request seed: same seed, same tokens, whatever the batch
    max_tokens: int = 256  # new tokens at most
    min_tokens: int = 0  # stop ids and EOS are suppressed until this many were generated
    stop_token_ids: list[int] = field(default_factory=list)  # extra stop ids beside the model's EOS ids
    ignore_eos: bool = False  # do not stop at the model's EOS ids (stop_token_ids still stop)
    logprobs: bool = False  # return the chosen token's logprob
    top_logprobs: int = 0  # also return this many top candidates (0..MAX_TOP_LOGPROBS)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    def validate(self, vocab_size: int | None = None) -> "SamplingParams":
        """Raise SamplingParamsError naming the field, the value and the accepted range."""
        def bad(name: str, value: object, rule: str) -> SamplingParamsError:
            return SamplingParamsError(name, f"got {value!r}, must be {rule}")

        if not (0.0 <= self.temperature <= 100.0) or self.temperature != self.temperature:
            raise bad("temperature", self.temperature, "in [0, 100] (0 = greedy)")
        if not (0.0 < self.top_p <= 1.0):
            raise bad("top_p", self.top_p, "in (0, 1]")
        if self.top_k < 0 or (vocab_size is not None and self.top_k > vocab_size):
            raise bad("top_k", self.top_k, f"in [0, {vocab_size}] (0 = off)")
        if not (0.0 <= self.min_p <= 1.0):
            raise bad("min_p", self.min_p, "in [0, 1]")
        if not (0.0 < self.repetition_penalty <= 10.0):
            raise bad("repetition_penalty", self.repetition_penalty, "in (0, 10]")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (-2.0 <= value <= 2.0):
                raise bad(name, value, "in [-2, 2]")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise bad("seed", self.seed, "in [0, 2^63)")
        if self.max_tokens < 1:
            raise bad("max_tokens", self.max_tokens, ">= 1")
        if not (0 <= self.min_tokens <= self.max_tokens):
            raise bad("min_tokens", self.min_tokens, f"in [0, max_tokens={self.max_tokens}]")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise bad("stop_token_ids", f"{len(self.stop_token_ids)} ids", f"at most {MAX_STOP_TOKEN_IDS} ids")
        if vocab_size is not None:
            for tid in self.stop_token_ids:
                if not (0 <= tid < vocab_size):
                    raise bad("stop_token_ids", tid, f"a token id in [0, {vocab_size})")
        if not (0 <= self.top_logprobs <= MAX_TOP_LOGPROBS):
            raise bad("top_logprobs", self.top_logprobs, f"in [0, {MAX_TOP_LOGPROBS}]")
        return self
