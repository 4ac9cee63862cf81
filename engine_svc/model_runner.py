"""The model runner: a step plan -> input tensors + attention metadata -> model -> sampled tokens.

Surface (engine_svc/step.py): load_model, determine_num_blocks, allocate_kv_cache, warmup, launch
(StepPlan -> PendingStep, asynchronous) and execute (list[ScheduledSeq], synchronous).

The input batch persists across steps (engine_svc/input_batch.py): a plan adds and drops rows and
names who runs; packing is numpy over the rows into host staging buffers (pinned on CUDA), copied
without blocking straight into the fixed device buffers (engine_svc/step_buffers.py) that the
CUDA graphs were captured on. On CUDA, pure-decode steps replay a graph for the next captured batch
size (padding rows write nowhere: slot -1, and their outputs are dropped); other steps run eagerly
on views of the same buffers. ``launch`` returns as soon as the step is enqueued: a decode input
that the previous step sampled is taken from that step's device tensor, so the CPU can plan and
pack step N+1 while the GPU runs step N.
"""

from __future__ import annotations

import bisect
import logging
from typing import Callable

import torch

from kvmesh.blocks import blocks_for

from engine_svc import kv_sizing
from engine_svc.attention.base import AttentionMetadata
from engine_svc.attention.selector import get_attention_backend
from engine_svc.config import ConfigError, EngineConfig
from engine_svc.cuda_graphs import (GRAPH_BATCH_SIZES, MIXED_GRAPH_TOKENS, DecodeGraphs, MixedGraph,
                                    capture_decode_graphs, capture_mixed_graphs, mixed_graph_reserve_bytes)
from engine_svc.input_batch import MIN_LISTED_SINGLES, InputBatch, PackedStep
from engine_svc.model import loader
from engine_svc.model.ops import get_layer_ops
from engine_svc.pending_step import PendingStep, sample_async
from engine_svc.sampler import SampleRequest, Sampler
from engine_svc.sampling_params import MAX_TOP_LOGPROBS, SamplingParams
from engine_svc.step import ModelInfo, NewSeq, SampledToken, ScheduledSeq, StepPlan
from engine_svc.step_buffers import StepBuffers

log = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 256 << 20
GRAPH_RESERVE_BYTES = 256 << 20  # kept free for the graphs' memory pool, captured after sizing
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

__all__ = ["ModelRunner", "GRAPH_BATCH_SIZES", "CPU_KV_CACHE_BYTES"]


class ModelRunner:
    """Owns the model, the KV cache, the sampler, the input batch and the CUDA graphs.

    Driven by one thread (the engine loop's). On CUDA the device's memory baseline is taken here,
    before anything is loaded: the KV cache is sized from this engine's own share (kv_sizing.py).
    """

    def __init__(self, config: EngineConfig, attention_backend: str | None = None,
                 layer_ops: str | None = None):
        """attention_backend / layer_ops: None = the device's default ("triton" on CUDA, "torch"
        elsewhere); tests name them to run the Triton path through Triton's CPU interpreter."""
        self.config = config.validate()
        self.backend_name, self.ops_name = attention_backend, layer_ops
        self.device = torch.device(config.device)
        self.block_size = config.block_size
        self.model = None
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.num_blocks = 0
        self.graphs = DecodeGraphs([])  # pure-decode graphs (CUDA, after warmup)
        self.mixed_graphs: dict[int, MixedGraph] = {}  # padded token count -> graph (CUDA, after warmup)
        self.mixed_sizes: list[int] = []
        self.memory_baseline = (kv_sizing.MemoryBaseline.take(self.device)
                                if self.device.type == "cuda" else None)
        self._inflight: PendingStep | None = None  # the last launched step, until its result()

    # ---- loading and sizing ----

    def load_model(self, on_progress: Callable[[float], None] | None = None) -> ModelInfo:
        """Read the config, check max_model_len, build the model with its weights and the sampler.

        Raises:
            ConfigError: max_model_len beyond the model's own limit (both numbers named).
            loader.WeightsError / UnsupportedModelError: bad checkpoint or architecture (named).
        """
        cfg = self.config
        hf, _ = loader.read_hf_config(cfg.model)
        model_max_len = int(hf.get("max_position_embeddings") or 0)
        if not model_max_len:
            raise ConfigError(f"{cfg.model}/config.json has no max_position_embeddings: kvmesh cannot "
                              f"tell the model's context limit")
        if cfg.max_model_len is not None and cfg.max_model_len > model_max_len:
            raise ConfigError(
                f"max_model_len={cfg.max_model_len} exceeds the model's limit of {model_max_len} "
                f"(max_position_embeddings in {cfg.model}/config.json): set --max-model-len "
                f"{model_max_len} or lower")
        self.max_model_len = cfg.max_model_len or model_max_len
        loaded = loader.load(cfg.model, cfg.load_format, cfg.dtype, self.device, cfg.seed,
                             self.max_model_len, on_progress, get_layer_ops(self.device, self.ops_name))
        self.model, self.model_cfg, self.dtype = loaded.model, loaded.cfg, loaded.dtype
        # FP8: the attention backends quantise on write and dequantise on read (scales 1.0, as vLLM)
        self.kv_dtype = self.dtype if cfg.kv_cache_dtype == "auto" else torch.float8_e4m3fn
        self.backend = get_attention_backend(self.device, self.backend_name)
        self.sampler = Sampler(loaded.cfg.vocab_size, self.device, loaded.eos_token_ids, cfg.seed)
        self.max_blocks_per_seq = blocks_for(self.max_model_len, self.block_size)
        max_tokens = max(cfg.max_num_batched_tokens, cfg.max_num_seqs)
        # one row more than sequences: a mixed graph's last row never has tokens (cuda_graphs.py)
        self.graph_rows = cfg.max_num_seqs + 1
        self.buffers = StepBuffers(self.device, max_tokens, self.graph_rows, self.max_blocks_per_seq)
        self.batch = InputBatch(cfg.max_num_seqs, self.max_model_len, self.max_blocks_per_seq, self.block_size)
        cuda = self.device.type == "cuda"
        self._greedy_host = [torch.zeros(cfg.max_num_seqs, dtype=torch.int64, pin_memory=True)
                             for _ in range(2)] if cuda else None
        self.info = ModelInfo(
            name=loaded.name, vocab_size=loaded.cfg.vocab_size, model_max_len=model_max_len,
            eos_token_ids=loaded.eos_token_ids, bos_token_id=loaded.bos_token_id,
            dtype=DTYPE_NAMES[loaded.dtype], num_layers=loaded.cfg.num_layers,
            num_kv_heads=loaded.cfg.num_kv_heads, head_dim=loaded.cfg.head_dim)
        return self.info

    def kv_bytes_per_block(self) -> int:
        c = self.model_cfg
        return 2 * c.num_layers * self.block_size * c.num_kv_heads * c.head_dim * self.kv_dtype.itemsize

    def determine_num_blocks(self) -> int:
        """Profile one forward pass at max_num_batched_tokens, then size the cache.

        num_gpu_blocks_override wins; else kv_cache_memory bytes; else (CUDA) this engine's share,
        gpu_memory_utilization * total memory, less what it added since its memory baseline.
        """
        cfg = self.config
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        scratch_bytes = self._profile_run()
        if cfg.num_gpu_blocks_override is not None:
            return cfg.num_gpu_blocks_override
        if cfg.kv_cache_memory is not None or not cuda:
            budget = cfg.kv_cache_memory if cfg.kv_cache_memory is not None else CPU_KV_CACHE_BYTES
        else:
            reserve = 0 if cfg.enforce_eager else GRAPH_RESERVE_BYTES + mixed_graph_reserve_bytes(
                self.model_cfg, self.dtype, self._mixed_graph_tokens())
            budget = kv_sizing.kv_cache_budget(self.memory_baseline, cfg.gpu_memory_utilization,
                                               scratch_bytes, reserve)
        num_blocks = int(budget // self.kv_bytes_per_block())
        if num_blocks < self.max_blocks_per_seq:
            raise ConfigError(
                f"the KV cache fits {num_blocks} blocks of {self.block_size} tokens, fewer than one "
                f"max_model_len={self.max_model_len} sequence needs ({self.max_blocks_per_seq}): raise "
                f"--gpu-memory-utilization / --kv-cache-memory or lower --max-model-len")
        return num_blocks

    def _profile_run(self) -> int:
        """Forward max_num_batched_tokens tokens (as sequences of at most max_model_len) through a
        scratch cache, with logits for max_num_seqs rows. Returns the scratch cache's bytes."""
        total = min(self.config.max_num_batched_tokens, self.config.max_num_seqs * self.max_model_len)
        lens = [self.max_model_len] * (total // self.max_model_len)
        if total % self.max_model_len:
            lens.append(total % self.max_model_len)
        blocks_per_seq = [blocks_for(n, self.block_size) for n in lens]
        self._make_caches(sum(blocks_per_seq))
        seqs, next_block = [], 0
        for i, (n, nb) in enumerate(zip(lens, blocks_per_seq)):
            seqs.append(_dummy_seq(n, list(range(next_block, next_block + nb)), f"profile-{i}"))
            next_block += nb
        hidden = self._forward(seqs)
        rows = min(self.config.max_num_seqs, hidden.shape[0])
        # The sampler's worst case too: sort (top-p), penalties, noise and logprobs over every row.
        params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, min_p=0.01, repetition_penalty=1.1,
                                frequency_penalty=0.1, logprobs=True, top_logprobs=MAX_TOP_LOGPROBS)
        self.sampler(self.model.compute_logits(hidden[:rows]),
                     [SampleRequest(f"profile-{i}", params, [0], [0]) for i in range(rows)])
        scratch = sum(k.numel() * k.element_size() * 2 for k, _ in self.kv_caches)
        self.kv_caches = []
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return scratch

    def _make_caches(self, num_blocks: int) -> None:
        c = self.model_cfg
        shape = (num_blocks, self.block_size, c.num_kv_heads, c.head_dim)
        # Zero-filled: padded block-table entries point at block 0, and 0 * NaN would poison sums.
        self.kv_caches = [(torch.zeros(shape, dtype=self.kv_dtype, device=self.device),
                           torch.zeros(shape, dtype=self.kv_dtype, device=self.device))
                          for _ in range(c.num_layers)]

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self._make_caches(num_blocks)
        self.num_blocks = num_blocks

    def warmup(self) -> None:
        """Run the kernels once (compiles Triton), then capture decode CUDA graphs unless eager."""
        assert self.kv_caches, "allocate_kv_cache() first"
        width = self.max_blocks_per_seq
        self._forward([_dummy_seq(min(16, self.max_model_len), [0] * width, "warmup")])
        if self.device.type != "cuda":
            return
        cfg = self.config
        for seqs in eager_warmup_steps(cfg.max_num_seqs, cfg.max_num_batched_tokens, self.max_model_len, width):
            self._forward(seqs)
        if cfg.enforce_eager:
            return
        if not getattr(self.backend, "supports_cuda_graphs", True):
            log.warning("attention backend %s cannot be captured; running eagerly", self.backend.name)
            return
        self.graphs = capture_decode_graphs(self.model, self.kv_caches, self.backend, self.buffers,
                                            self.config.max_num_seqs, self.max_model_len, self.model_cfg,
                                            kv_fp8=self.kv_dtype == torch.float8_e4m3fn)
        if mixed_tokens := self._mixed_graph_tokens():
            self.mixed_graphs = capture_mixed_graphs(self.model, self.kv_caches, self.backend, self.buffers,
                                                     mixed_tokens, self.graph_rows, self.max_model_len)
            self.mixed_sizes = sorted(self.mixed_graphs)

    def _mixed_graph_tokens(self) -> int:
        """Largest step the mixed graphs serve (0: none are captured)."""
        cfg = self.config
        if cfg.enforce_eager or self.device.type != "cuda" or min(MIXED_GRAPH_TOKENS) > cfg.mixed_graph_max_tokens:
            return 0
        return min(cfg.mixed_graph_max_tokens, max(cfg.max_num_batched_tokens, cfg.max_num_seqs))

    # ---- one step ----

    @torch.inference_mode()
    def launch(self, plan: StepPlan) -> PendingStep:
        """Enqueue one step on the device and return without waiting for it.

        The previous step may still run: decode inputs it sampled are read from its device tensor.
        Raises AssertionError if an input token is neither known nor sampled by the previous step."""
        dropped = self.batch.apply(plan)
        if dropped:
            self.sampler.forget(dropped)  # their sampling state goes with their rows
        packed, hidden = self._run_forward(plan)
        return self._launch_sampling(packed, hidden, len(plan.req_ids))

    @torch.inference_mode()
    def execute(self, seqs: list[ScheduledSeq]) -> list[SampledToken | None]:
        """Run one step given in full, synchronously; a SampledToken for each seq with sample=True,
        None for the others. The persistent rows are replaced by these seqs (tests, simple drivers)."""
        if not seqs:
            return []
        return self.launch(self._plan_in_full(seqs)).result()

    def _plan_in_full(self, seqs: list[ScheduledSeq]) -> StepPlan:
        """A plan that drops every row and adds seqs as new rows (their tokens given in full)."""
        if self._inflight is not None:
            self._inflight.result()
        plan = StepPlan(removed_ids=list(self.batch.row_of))
        for s in seqs:
            known = list(s.prompt_token_ids) + list(s.output_token_ids)
            end = s.start_pos + len(s.new_token_ids)
            known += [0] * max(0, end - len(known))
            known[s.start_pos:end] = s.new_token_ids
            prompt_len = max(len(known) - len(s.output_token_ids), 0)
            plan.new_seqs.append(NewSeq(s.request_id, known[:prompt_len], known[prompt_len:], s.start_pos,
                                        list(s.block_ids), s.params))
            plan.req_ids.append(s.request_id)
            plan.num_new_tokens.append(len(s.new_token_ids))
            plan.sample.append(s.sample)
        return plan

    def _run_forward(self, plan: StepPlan) -> tuple[PackedStep, torch.Tensor]:
        """Pack, upload and run the model (a graph replay for pure decode): (packed, hidden [T])."""
        n = len(plan.req_ids)
        graph_size = mixed = None
        tokens = sum(plan.num_new_tokens)
        if tokens == n:
            graph_size = self.graphs.batch_size_for(n)
        if graph_size is None:
            mixed = self._mixed_graph_for(plan, tokens)
        st = self.buffers.staging()
        packed = self.batch.pack(plan, st, pad_to=graph_size,
                                 pad_tokens_to=mixed.num_tokens if mixed else None,
                                 pad_rows_to=mixed.rows if mixed else None)
        self._last_token_index = packed.last_token_index
        self.buffers.upload(packed)
        d = self.buffers.dev
        if packed.num_gathered:
            prev = self._inflight
            assert prev is not None and prev.token_ids is not None, "no previous step to take tokens from"
            g = packed.num_gathered
            d.ids.index_copy_(0, d.gather_dst[:g], prev.token_ids.index_select(0, d.gather_src[:g]))
        if graph_size is not None:
            return packed, self.graphs.graph(graph_size, packed.max_seq_len).replay()[:packed.num_tokens]
        T = packed.num_tokens
        if mixed is not None:
            return packed, mixed.replay()[:T]
        hidden = self.model(d.ids[:T], d.pos[:T], self.kv_caches, self._metadata(packed), self.backend)
        return packed, hidden

    def _mixed_graph_for(self, plan: StepPlan, tokens: int):
        """The smallest mixed-step graph that holds the step, or None (eager): none is big enough, or the
        backend runs the step faster eagerly (the Triton backend: long steps of prefill chunks only)."""
        if not self.mixed_sizes or tokens > self.mixed_sizes[-1]:
            return None
        if self.backend.runs_eagerly(tokens, plan.num_new_tokens):
            return None
        return self.mixed_graphs[self.mixed_sizes[bisect.bisect_left(self.mixed_sizes, tokens)]]

    def _metadata(self, packed: PackedStep) -> AttentionMetadata:
        d, rows = self.buffers.dev, packed.num_rows
        return AttentionMetadata(
            query_start_loc=d.qsl[:rows + 1], seq_lens=d.lens[:rows], block_tables=d.bt[:rows, :packed.block_width],
            slot_mapping=d.slots[:packed.padded_tokens], max_query_len=packed.max_query_len,
            max_seq_len=packed.max_seq_len, num_seqs=rows, min_query_len=packed.min_query_len,
            max_prefix_len=packed.max_prefix_len,
            decode_seq_index=d.singles[:packed.num_singles] if packed.num_singles else None)

    def _launch_sampling(self, packed: PackedStep, hidden: torch.Tensor, num_reqs: int) -> PendingStep:
        batch = self.batch
        pending = None
        if packed.num_sampled:
            rows = packed.sampled_rows.tolist()
            logits = self.model.compute_logits(hidden[self.buffers.dev.sample_idx[:packed.num_sampled]])
            # The previous step's tokens first: the sampler then sees every row's outputs so far (its
            # seeded counters and penalties). This waits only for that step; this step's forward is
            # already queued behind it, so the GPU does not idle.
            if self._inflight is not None:
                self._inflight.result()
            plain = bool(batch.plain_greedy[packed.sampled_rows].all())

            def reqs() -> list[SampleRequest]:
                return [SampleRequest(batch.request_ids[r], batch.params[r], batch.prompts[r], batch.outputs[r])
                        for r in rows]
            host = None if self._greedy_host is None else self._greedy_host[packed.step_id % 2]
            pending = sample_async(self.sampler, logits, reqs, plain, host)
        step = PendingStep(num_reqs, packed.sampled_positions.tolist(), pending,
                           lambda tokens: self._complete(step, packed, tokens))
        self._inflight = step
        return step

    def _complete(self, step: PendingStep, packed: PackedStep, tokens: list[int]) -> None:
        self.batch.complete(packed, tokens)
        if self._inflight is step:
            self._inflight = None

    # ---- tests and profiling: one step given in full, without sampling ----

    @torch.inference_mode()
    def _forward(self, seqs: list[ScheduledSeq]) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] for the packed new tokens of `seqs` (nothing sampled)."""
        plan = self._plan_in_full([_no_sample(s) for s in seqs])
        self.batch.apply(plan)
        packed, hidden = self._run_forward(plan)
        self.batch.remove(plan.req_ids)
        return hidden

    def _prepare(self, seqs: list[ScheduledSeq], pad_to: int | None = None):
        """Pack seqs as a step would: (input_ids [T], positions [T], AttentionMetadata) device views."""
        plan = self._plan_in_full(seqs)
        self.batch.apply(plan)
        packed = self.batch.pack(plan, self.buffers.staging(), pad_to=pad_to)
        self._last_token_index = packed.last_token_index
        self.buffers.upload(packed)
        self.batch.remove(plan.req_ids)
        d, T = self.buffers.dev, packed.padded_tokens
        return d.ids[:T], d.pos[:T], self._metadata(packed)


def _no_sample(s: ScheduledSeq) -> ScheduledSeq:
    return ScheduledSeq(s.request_id, s.new_token_ids, s.start_pos, s.block_ids, False, s.params,
                        s.prompt_token_ids, s.output_token_ids)


def eager_warmup_steps(max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                       width: int) -> list[list[ScheduledSeq]]:
    """The eager steps whose kernel variants are compiled at warm-up rather than at the first such
    step in service (a stall of seconds each; bench/step_profile.py names any compiled mid-run).

    Attention picks its programs by the step's shape (kernels/paged_attention.py): decode rows listed
    beside prefill chunks or not; short chunks; launches of more than SHORT_PREFILL_TOKENS tokens take
    the large block-table tiles while every chunk is at most that long, and a chunk longer than that
    goes to kernels/prefill_attention.py, as does a step of chunks only of EAGER_MIN_TOKENS or more.
    Each class is run alone and beside listed decode rows. No step has more than max_num_seqs rows.
    """
    from kernels.paged_attention import SHORT_PREFILL_TOKENS
    from kernels.prefill_attention import EAGER_MIN_TOKENS

    num_decode = min(MIN_LISTED_SINGLES, max_num_seqs - 1)
    chunk = min(64, max_model_len, max(max_num_batched_tokens, max_num_seqs) - num_decode)
    if chunk <= 1:
        return []

    def seq(n, name):
        return _dummy_seq(n, [0] * width, f"warmup-{name}")

    decode = [seq(1, f"decode-{i}") for i in range(num_decode)]
    short = seq(min(4, chunk), "short")
    steps = [decode + [seq(chunk, "chunk")], decode[:1] + [short], decode + [short]]
    room = min(max_model_len, max_num_batched_tokens - num_decode)
    half = SHORT_PREFILL_TOKENS // 2 + 1  # two such chunks: a launch over the limit, each chunk under it
    if max_num_batched_tokens - num_decode >= 2 * half and max_model_len >= half and max_num_seqs >= 3:
        pair = [seq(half, "half-a"), seq(half, "half-b")]
        # alone (chunks only: the contiguous kernel), beside one decode row and beside listed ones
        steps += [pair, decode[:1] + pair, decode[:max_num_seqs - 2] + pair]
    else:  # chunks only, at least EAGER_MIN_TOKENS in all (eager, kernels/prefill_attention.py's short tiles)
        n = min(max_model_len, EAGER_MIN_TOKENS)
        k = -(-EAGER_MIN_TOKENS // n)
        if k <= max_num_seqs and k * n <= max_num_batched_tokens:
            steps.append([seq(n, f"eager-{i}") for i in range(k)])
    if room >= SHORT_PREFILL_TOKENS + 1:
        big = seq(SHORT_PREFILL_TOKENS + 1, "long")
        steps += [[big], decode + [big]]
    return steps


def _dummy_seq(n: int, block_ids: list[int], rid: str = "profile") -> ScheduledSeq:
    return ScheduledSeq(rid, [0] * n, 0, block_ids, False, SamplingParams(), [], [])
