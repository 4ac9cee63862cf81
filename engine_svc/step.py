"""What one engine step hands from the scheduler to the model runner, and what comes back.

The scheduler (no torch) decides *which tokens* of *which requests* run this step; the model runner
turns that into tensors and attention metadata, runs the model and samples. These two plain records
are the whole boundary between them.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine_svc.sampling_params import SamplingParams


@dataclass(slots=True)
class ScheduledSeq:
    """One request's share of a step. Built by the scheduler, read by the model runner."""

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
    """The token sampled for one ScheduledSeq with sample=True. Built by the runner, read by the engine."""

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
#   runner = ModelRunner(config: EngineConfig)
#   info: ModelInfo = runner.load_model(on_progress: Callable[[float], None] | None = None)
#   num_blocks: int = runner.determine_num_blocks()   # profiling pass; honours kv_cache_memory,
#                                                      # gpu_memory_utilization, num_gpu_blocks_override
#   runner.allocate_kv_cache(num_blocks)
#   runner.warmup()                                    # compile kernels, capture CUDA graphs
#   results: list[SampledToken | None] = runner.execute(seqs: list[ScheduledSeq])
#                                                      # aligned with seqs; None where sample=False
