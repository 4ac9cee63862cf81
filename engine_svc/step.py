"""What one engine step hands from the scheduler to the model runner, and what comes back.

The scheduler (no torch) decides *which tokens* of *which requests* run this step; the model runner
turns that into tensors and attention metadata, runs the model and samples. The runner's input batch
persists across steps (engine_svc/input_batch.py), so a step names new requests in full and running
ones only by their differences, as vLLM's v1 SchedulerOutput does:

    StepPlan.new_seqs        requests joining the batch: every known token, start_pos, block table
    StepPlan.req_ids         every request of the step, in batch order, with num_new_tokens and sample
    StepPlan.new_block_ids   running requests whose block table grew: only the appended blocks
    StepPlan.removed_ids     requests that left since the last step (finished, aborted, preempted)

The token ids a running request computes are already in its row (prompt tokens; sampled tokens the
runner produced itself), so nothing per token crosses this boundary for running requests.

ScheduledSeq is the same step for a single request in full. Tests and simple runners use it
(``ModelRunner.execute(list[ScheduledSeq])``); the engine core uses StepPlan.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine_svc.sampling_params import SamplingParams


@dataclass(slots=True)
class NewSeq:
    """A request that joins the runner's batch: first admission, or resumed after a preemption.

    Built by the scheduler, read by the runner (which copies what it keeps)."""

    request_id: str
    prompt_token_ids: list[int]  # the prompt (the runner copies it; penalties read it)
    output_token_ids: list[int]  # tokens generated so far (non-empty after a preemption)
    # Positions [0, start_pos) are already in the KV cache (a prefix-cache hit): the runner computes
    # from start_pos on and writes KV only at the slots of the tokens it computes.
    start_pos: int
    # The block table; it may begin with blocks shared with other requests (read-only for this one).
    block_ids: list[int]
    params: SamplingParams


@dataclass(slots=True)
class StepPlan:
    """One step's batch as differences against the runner's persistent rows.

    Built by the scheduler (new_seqs, req_ids, num_new_tokens, sample, new_block_ids) and the engine
    core (removed_ids); read by ModelRunner.launch. Lists are the runner's to read during launch only.
    """

    new_seqs: list[NewSeq] = field(default_factory=list)
    # Every request of the step in batch order (running ones first, then the new ones), with
    # aligned lists: tokens it computes this step, and whether the step samples its next token.
    req_ids: list[str] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    sample: list[bool] = field(default_factory=list)
    # (request id, block ids appended to its table this step) for running requests that grew.
    new_block_ids: list[tuple[str, list[int]]] = field(default_factory=list)
    # Requests whose rows the runner drops before this step: finished, aborted or preempted since
    # the last launch (a dropped id may join again in new_seqs of the same plan).
    removed_ids: list[str] = field(default_factory=list)


@dataclass(slots=True)
class ScheduledSeq:
    """One request's share of a step, in full. Built by tests (and SchedulerOutput.seqs)."""

    request_id: str
    new_token_ids: list[int]  # tokens whose K/V this step computes: a prefill chunk or the last sampled token
    start_pos: int  # position of new_token_ids[0] (== the request's num_computed_tokens before the step)
    block_ids: list[int]  # the request's block table; covers positions [0, start_pos + len(new_token_ids))
    sample: bool  # True when this chunk reaches the end of the known tokens: sample the next token
    params: SamplingParams
    prompt_token_ids: list[int]  # the prompt (repetition penalty reads it)
    output_token_ids: list[int]  # tokens generated so far (penalties, min_tokens, the seeded RNG counter)


@dataclass(slots=True)
class SampledToken:
    """The token sampled for one sampling request of a step. Built by the runner, read by the engine."""

    token_id: int
    logprob: float | None = None  # log-softmax of the processed logits at token_id, when asked
    top_logprobs: list[tuple[int, float]] | None = None  # (id, logprob), best first, when asked


@dataclass(slots=True)
class ModelInfo:
    """What the loaded model tells the engine. Returned by ModelRunner.load_model()."""

    name: str  # served model name (directory name, or "kvmesh-demo")
    vocab_size: int  # ids outside [0, vocab_size) are rejected before they reach the model
    model_max_len: int  # the model's own context limit (max_position_embeddings, or the config's)
    eos_token_ids: list[int]  # every EOS id of config.json and generation_config.json, deduplicated
    bos_token_id: int | None
    dtype: str  # "float32" | "bfloat16" | "float16"
    num_layers: int
    num_kv_heads: int
    head_dim: int


# The model runner (engine_svc/model_runner.py) offers exactly this surface to the engine loop:
#
#   runner = ModelRunner(config: EngineConfig)          # takes the device's memory baseline
#   info: ModelInfo = runner.load_model(on_progress: Callable[[float], None] | None = None)
#   num_blocks: int = runner.determine_num_blocks()   # profiling pass; honours kv_cache_memory,
#                                                      # gpu_memory_utilization, num_gpu_blocks_override
#   runner.allocate_kv_cache(num_blocks)
#   runner.warmup()                                    # compile kernels, capture CUDA graphs
#   pending = runner.launch(plan: StepPlan)            # enqueue the step on the device, return at once
#   results: list[SampledToken | None] = pending.result()   # aligned with plan.req_ids; waits
#   results = runner.execute(seqs: list[ScheduledSeq])  # the same step in full, synchronously
