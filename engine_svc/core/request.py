"""One generation request as the engine core sees it: token ids, progress, and how it ended.

Imports no torch. Owned by the engine loop thread only (the scheduler and the engine core mutate it);
RPC handlers never touch a Request, they see RequestOutput records.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from engine_svc.sampling_params import SamplingParams
from engine_svc.step import SampledToken


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # in the waiting queue: new, or preempted (its KV was dropped)
    RUNNING = "running"  # holds KV blocks and is scheduled every step until it finishes
    FINISHED = "finished"  # blocks freed; finish_reason says why


class FinishReason(enum.Enum):
    """Why a request ended (mapped to kvmesh.v1.FinishReason by the service)."""

    STOP_TOKEN = "stop_token"  # an EOS id (unless ignore_eos) or one of stop_token_ids
    LENGTH = "length"  # max_tokens reached, or the sequence reached max_model_len
    CANCELLED = "cancelled"  # aborted: Abort RPC, client cancel, deadline
    ERROR = "error"  # the engine could not continue it (see Request.error / error_kind)


class ErrorKind(enum.Enum):
    """With FinishReason.ERROR: why (mapped to kvmesh.v1.ErrorReason by the service)."""

    INTERNAL = "internal"  # the model step failed
    OUT_OF_KV_CACHE = "out_of_kv_cache"  # the sequence cannot fit in the KV cache even alone
    DRAINING = "draining"  # the engine is shutting down and the drain grace ran out
    ENGINE_FAILED = "engine_failed"  # a fatal device error or a dead engine thread: the process exits


@dataclass(slots=True, eq=False)  # identity equality: queues remove and find requests by identity
class Request:
    """A request's state. Invariant: 0 <= num_computed_tokens <= num_tokens.

    The scheduler's one rule reads two numbers: ``num_tokens`` (prompt + generated) and
    ``num_computed_tokens`` (positions whose K/V are in the cache). Prefill, chunked prefill, decode
    and recompute after preemption are all "compute the positions in between".
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0  # lower runs first; equal priorities are first-come first-served
    arrival: int = 0  # admission order, set by the scheduler (FCFS tie-break, "newest" for preemption)
    max_model_len: int | None = None  # the sequence never grows past this many tokens
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Tokens sampled by launched steps whose ids have not reached the host yet (async scheduling:
    # the next step is scheduled while the previous one runs). The scheduler counts them as known.
    num_output_placeholders: int = 0
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    stop_token_id: int | None = None  # with FinishReason.STOP_TOKEN: the id that matched
    error: str | None = None  # with FinishReason.ERROR: a precise message
    error_kind: ErrorKind | None = None  # with FinishReason.ERROR
    # Prefix caching. cache_salt: requests share cached blocks only with requests of the same salt
    # (a tenant's own namespace); use_prefix_cache False: neither reuses nor leaves cached blocks.
    cache_salt: str = ""
    use_prefix_cache: bool = True
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of its full blocks so far
    # Tokens covered by the leading table blocks already findable (BlockManager.num_hashed x block
    # size), kept by the scheduler so that a step looks a request's blocks up only once it filled one.
    hashed_up_to: int = 0
    num_cached_tokens: int | None = None  # prompt tokens found cached at first admission
    # The request's telemetry (kvmesh.telemetry.engine.RequestTrace), set by the service and read by
    # the hooks; opaque to the core. None: not traced.
    trace: object | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_remaining_tokens(self) -> int:
        """Positions still to compute before the next token can be sampled (placeholders included)."""
        return self.num_tokens + self.num_output_placeholders - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """True while more than the last sampled token is uncomputed (prompt, or recompute)."""
        return self.num_remaining_tokens > 1 or self.num_output_tokens + self.num_output_placeholders == 0

    @property
    def awaits_last_token(self) -> bool:
        """A placeholder is its last possible token (max_tokens or max_model_len): schedule nothing."""
        if not self.num_output_placeholders:
            return False
        return (self.num_output_tokens + self.num_output_placeholders >= self.params.max_tokens
                or (self.max_model_len is not None
                    and self.num_tokens + self.num_output_placeholders >= self.max_model_len))

    @property
    def max_num_tokens(self) -> int:
        """The longest this sequence can become: prompt + max_tokens, capped by max_model_len."""
        limit = self.num_prompt_tokens + self.params.max_tokens
        return min(limit, self.max_model_len) if self.max_model_len else limit

    def token_ids(self, start: int, stop: int) -> list[int]:
        """Token ids [start, stop) of prompt + output without building the concatenation."""
        n = self.num_prompt_tokens
        if stop <= n:
            return self.prompt_token_ids[start:stop]
        if start >= n:
            return self.output_token_ids[start - n:stop - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[:stop - n]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request. Built by the engine thread, read by the RPC handler.

    A finished output is the last one for its request; ``finished`` outputs may carry tokens too.
    """

    request_id: str
    tokens: list[SampledToken]  # tokens sampled this step (usually one; none for an abort)
    first_index: int  # index of tokens[0] among the request's generated tokens
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_token_id: int | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    error: str | None = None
    error_kind: ErrorKind | None = None
    num_cached_tokens: int = 0  # on finished outputs: prompt tokens whose KV came from the prefix cache
