"""The model runner: scheduler output -> input tensors + attention metadata -> model -> sampled tokens.

Surface (engine_svc/step.py): load_model, determine_num_blocks, allocate_kv_cache, warmup, execute.

Inputs are built with numpy over the whole batch (no per-token Python) into host buffers (pinned on
CUDA) and copied to the device without blocking. On CUDA, pure-decode steps replay CUDA graphs
captured for a set of batch sizes; a step is padded up to the next captured size (padding tokens
write nowhere: slot -1, and their outputs are dropped).
"""

from __future__ import annotations

import bisect
import logging
from typing import Callable

import numpy as np
import torch

from kvmesh.blocks import blocks_for

from engine_svc.attention.base import AttentionMetadata
from engine_svc.attention.selector import get_attention_backend
from engine_svc.config import ConfigError, EngineConfig
from engine_svc.model import loader
from engine_svc.model.ops import get_layer_ops
from engine_svc.sampler import SampleRequest, Sampler
from engine_svc.sampling_params import MAX_TOP_LOGPROBS, SamplingParams
from engine_svc.step import ModelInfo, SampledToken, ScheduledSeq

log = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 256 << 20
GRAPH_BATCH_SIZES = [1, 2, 4, 8] + list(range(16, 257, 16)) + list(range(288, 513, 32))
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class ModelRunner:
    """Owns the model, the KV cache, the sampler and the CUDA graphs. Driven by the engine loop."""

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
        self.graphs: dict[int, _DecodeGraph] = {}
        self.graph_pool = None

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
        self._alloc_buffers()
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

        num_gpu_blocks_override wins; else kv_cache_memory bytes; else (CUDA) what is left of
        gpu_memory_utilization * total memory after the weights and the profiled peak activations.
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
            torch.cuda.synchronize(self.device)
            free, total = torch.cuda.mem_get_info(self.device)
            # The profile's scratch KV cache is part of the peak but will be replaced by the real one.
            peak = torch.cuda.max_memory_allocated(self.device) - scratch_bytes
            non_torch = (total - free) - torch.cuda.memory_reserved(self.device)
            graph_reserve = 0 if cfg.enforce_eager else 256 << 20
            budget = int(total * cfg.gpu_memory_utilization) - peak - max(non_torch, 0) - graph_reserve
            log.info("kv sizing: total=%d peak=%d non_torch=%d budget=%d", total, peak, non_torch, budget)
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
        for n, nb in zip(lens, blocks_per_seq):
            seqs.append(_dummy_seq(n, list(range(next_block, next_block + nb))))
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
        self._forward([_dummy_seq(min(16, self.max_model_len), [0] * self.max_blocks_per_seq)])
        if self.device.type != "cuda" or self.config.enforce_eager:
            return
        if not getattr(self.backend, "supports_cuda_graphs", True):
            log.warning("attention backend %s cannot be captured; running eagerly", self.backend.name)
            return
        sizes = [b for b in GRAPH_BATCH_SIZES if b <= self.config.max_num_seqs]
        for bs in reversed(sizes):  # largest first so smaller graphs reuse its memory pool
            graph = _DecodeGraph(self, bs)
            self.graph_pool = graph.pool
            self.graphs[bs] = graph
        self.graph_sizes = sorted(self.graphs)
        torch.cuda.synchronize(self.device)

    # ---- one step ----

    @torch.inference_mode()
    def execute(self, seqs: list[ScheduledSeq]) -> list[SampledToken | None]:
        """Run one step; return a SampledToken for each seq with sample=True, None for the others."""
        if not seqs:
            return []
        hidden = self._forward(seqs)
        sample_rows = [i for i, s in enumerate(seqs) if s.sample]
        results: list[SampledToken | None] = [None] * len(seqs)
        if not sample_rows:
            return results
        ends = self._last_token_index  # [num_seqs] index of each seq's last token in `hidden`
        idx = torch.from_numpy(ends[sample_rows]).to(self.device, non_blocking=True)
        logits = self.model.compute_logits(hidden[idx])
        reqs = [SampleRequest(seqs[i].request_id, seqs[i].params, seqs[i].prompt_token_ids, seqs[i].output_token_ids)
                for i in sample_rows]
        for i, tok in zip(sample_rows, self.sampler(logits, reqs)):
            results[i] = tok
        return results

    @torch.inference_mode()
    def _forward(self, seqs: list[ScheduledSeq]) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] for the packed new tokens of `seqs`."""
        num_tokens = sum(len(s.new_token_ids) for s in seqs)
        if self.graphs and num_tokens == len(seqs) and len(seqs) <= self.graph_sizes[-1]:
            graph = self.graphs[self.graph_sizes[bisect.bisect_left(self.graph_sizes, len(seqs))]]
            return graph.replay(self._prepare(seqs, pad_to=graph.batch_size))[:num_tokens]
        input_ids, positions, meta = self._prepare(seqs)
        return self.model(input_ids, positions, self.kv_caches, meta, self.backend)

    def _alloc_buffers(self) -> None:
        """Host staging buffers sized for the largest step (pinned on CUDA for async copies)."""
        pin = self.device.type == "cuda"
        max_tokens = max(self.config.max_num_batched_tokens, self.config.max_num_seqs)
        max_seqs = max(self.config.max_num_seqs, GRAPH_BATCH_SIZES[0])

        def buf(*shape, dtype=torch.int64):
            return torch.zeros(shape, dtype=dtype, pin_memory=pin)

        self.h_ids, self.h_pos, self.h_slots = buf(max_tokens), buf(max_tokens), buf(max_tokens)
        self.h_qsl = buf(max_seqs + 1, dtype=torch.int32)
        self.h_lens = buf(max_seqs, dtype=torch.int32)
        self.h_bt = buf(max_seqs * self.max_blocks_per_seq, dtype=torch.int32)  # viewed [rows, width]
        self._copied = torch.cuda.Event() if pin else None  # host buffers are free once this fires

    def _prepare(self, seqs: list[ScheduledSeq], pad_to: int | None = None):
        """Pack seqs into (input_ids [T], positions [T], AttentionMetadata). With pad_to, the batch
        is padded with one-token sequences of length 1 that write nowhere (decode graphs)."""
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's async copies still read the buffers
        n = len(seqs)
        q_lens = np.fromiter((len(s.new_token_ids) for s in seqs), dtype=np.int64, count=n)
        starts = np.fromiter((s.start_pos for s in seqs), dtype=np.int64, count=n)
        cu = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(q_lens, out=cu[1:])
        num_tokens = int(cu[-1])
        self._last_token_index = cu[1:] - 1
        seq_lens = starts + q_lens
        # positions: start_pos of each token's seq + its offset within the seq's chunk
        seq_of_token = np.repeat(np.arange(n), q_lens)
        positions = np.arange(num_tokens) - cu[:-1][seq_of_token] + starts[seq_of_token]
        nbt = max(len(s.block_ids) for s in seqs)
        # Only the used columns travel; a graph keeps stale entries past them, which no sequence
        # reads (a kernel reads the table only below ceil(seq_len / block_size)).
        rows, width = (pad_to, nbt) if pad_to else (n, nbt)
        T = pad_to if pad_to else num_tokens
        h_bt = self.h_bt[:rows * width].view(rows, width)
        bt = h_bt.numpy()
        bt[:] = 0
        for i, s in enumerate(seqs):
            bt[i, :len(s.block_ids)] = s.block_ids
        slots = bt[seq_of_token, positions // self.block_size].astype(np.int64) * self.block_size \
            + positions % self.block_size

        ids, pos, slot = self.h_ids.numpy(), self.h_pos.numpy(), self.h_slots.numpy()
        qsl, lens = self.h_qsl.numpy(), self.h_lens.numpy()
        ids[:num_tokens] = np.concatenate([s.new_token_ids for s in seqs])
        pos[:num_tokens], slot[:num_tokens] = positions, slots
        qsl[:n + 1], lens[:n] = cu, seq_lens
        if pad_to:
            extra = pad_to - n
            ids[num_tokens:T], pos[num_tokens:T], slot[num_tokens:T] = 0, 0, -1
            qsl[n + 1:pad_to + 1] = num_tokens + np.arange(1, extra + 1)
            lens[n:pad_to] = 1
        dev = self.device

        def put(h: torch.Tensor) -> torch.Tensor:
            return h.to(dev, non_blocking=True)

        meta = AttentionMetadata(
            query_start_loc=put(self.h_qsl[:rows + 1]), seq_lens=put(self.h_lens[:rows]),
            block_tables=put(h_bt), slot_mapping=put(self.h_slots[:T]),
            max_query_len=int(q_lens.max()), max_seq_len=int(seq_lens.max()), num_seqs=rows)
        out = put(self.h_ids[:T]), put(self.h_pos[:T]), meta
        if self._copied is not None:
            self._copied.record()
        return out


def _dummy_seq(n: int, block_ids: list[int]) -> ScheduledSeq:
    return ScheduledSeq("profile", [0] * n, 0, block_ids, False, SamplingParams(), [], [])


class _DecodeGraph:
    """One captured decode step for a fixed batch size; inputs are copied into static tensors."""

    def __init__(self, runner: ModelRunner, batch_size: int):
        self.runner, self.batch_size = runner, batch_size
        dev, B, W = runner.device, batch_size, runner.max_blocks_per_seq
        self.ids = torch.zeros(B, dtype=torch.int64, device=dev)
        self.pos = torch.zeros(B, dtype=torch.int64, device=dev)
        self.meta = AttentionMetadata(
            query_start_loc=torch.arange(B + 1, dtype=torch.int32, device=dev),
            seq_lens=torch.ones(B, dtype=torch.int32, device=dev),
            block_tables=torch.zeros(B, W, dtype=torch.int32, device=dev),
            slot_mapping=torch.full((B,), -1, dtype=torch.int64, device=dev),
            max_query_len=1, max_seq_len=runner.max_model_len, num_seqs=B)
        model, caches, backend = runner.model, runner.kv_caches, runner.backend
        with torch.inference_mode():
            side = torch.cuda.Stream(dev)  # warm up on a side stream before capture, as torch advises
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(2):
                    model(self.ids, self.pos, caches, self.meta, backend)
            torch.cuda.current_stream(dev).wait_stream(side)
            torch.cuda.synchronize(dev)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=runner.graph_pool):
                self.out = model(self.ids, self.pos, caches, self.meta, backend)
        self.pool = self.graph.pool()

    def replay(self, inputs) -> torch.Tensor:
        ids, pos, meta = inputs
        self.ids.copy_(ids)
        self.pos.copy_(pos)
        self.meta.query_start_loc.copy_(meta.query_start_loc)
        self.meta.seq_lens.copy_(meta.seq_lens)
        self.meta.block_tables[:, :meta.block_tables.shape[1]].copy_(meta.block_tables)
        self.meta.slot_mapping.copy_(meta.slot_mapping)
        self.graph.replay()
        return self.out
