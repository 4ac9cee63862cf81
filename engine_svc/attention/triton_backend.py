"""The CUDA attention backend: our Triton kernels (kernels/) over the paged KV cache."""

from __future__ import annotations

import torch

from engine_svc.attention.base import AttentionBackend, AttentionMetadata
from kernels.kv_cache import write_kv_cache
from kernels.paged_attention import decode_graph_lengths, paged_attention
from kernels.prefill_attention import EAGER_MIN_TOKENS, gpu_takes


class TritonAttentionBackend(AttentionBackend):
    """write_kv_cache, then paged_attention (one launch, plus a merge when it splits the KV, or a
    decode launch beside the prefill one in a mixed batch). It gets this step's key/value too: prefill
    chunks then read their own K/V contiguously (kernels/prefill_attention.py).

    Capturable in CUDA graphs: nothing reads device tensors on the host; the tile plan and the split
    count depend only on the host ints of the metadata, so a graph captured with
    ``max_seq_len = max_model_len`` serves every shorter batch of the same shape; the runner captures
    one per split plan (``decode_graph_lengths``), so that short batches do not replay long ones' splits.
    """

    name = "triton"
    supports_cuda_graphs = True
    k_scale = v_scale = 1.0  # FP8 caches: per-tensor scales (vLLM's default without calibrated ones)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                sliding_window: int | None = None) -> torch.Tensor:
        write_kv_cache(key, value, k_cache, v_cache, meta.slot_mapping, self.k_scale, self.v_scale)
        return paged_attention(query, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens,
                               meta.max_query_len, meta.max_seq_len, scale, sliding_window,
                               k_scale=self.k_scale, v_scale=self.v_scale, decode_seq_index=meta.decode_seq_index,
                               key=key, value=value, min_query_len=meta.min_query_len,
                               max_prefix_len=meta.max_prefix_len)

    def runs_eagerly(self, num_tokens, query_lens):
        """A step the contiguous prefill kernel takes (chunks only, EAGER_MIN_TOKENS or more): a graph's
        padded rows would keep it on the block-table kernel. The length test first: most steps are
        shorter, and they skip the scan of their rows."""
        return num_tokens >= EAGER_MIN_TOKENS and gpu_takes(num_tokens, max(query_lens), min(query_lens))

    def decode_graph_lengths(self, num_seqs, num_heads, num_kv_heads, head_dim, max_model_len, device, kv_fp8):
        return decode_graph_lengths(num_seqs, num_heads, num_kv_heads, head_dim, max_model_len, device, kv_fp8)
