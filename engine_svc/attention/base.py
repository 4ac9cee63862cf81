"""The contract between the model, the model runner and the attention backends.

KV cache layout, one pair of tensors per layer, shared by every backend and by kernels/:

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]

A token's *slot* is ``block_id * block_size + offset_in_block``; ``slot_mapping[i] == -1`` means
"do not write token i" (padding). A sequence's block table lists its block ids in order; position p
of the sequence lives in block ``block_table[p // block_size]`` at offset ``p % block_size``.

One batch mixes prefill chunks and decode tokens. Queries are packed along dim 0 ("varlen"):

    seq:          0            1     2
    query tokens: [q q q q]    [q]   [q q]      query_start_loc = [0, 4, 5, 7]
    context:      |---c0---|q| |-c1-|q|  ...    seq_lens = context + new query tokens

Query token j of sequence s sits at position ``seq_lens[s] - query_len[s] + j`` and attends causally
to positions ``<= `` its own (and ``> position - sliding_window`` when a window is set). Its own K/V
are written to the cache before attention runs, so the cache holds every position it attends to.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Per-step attention inputs, built by the model runner and passed down explicitly (no globals)."""

    query_start_loc: torch.Tensor  # int32 [num_seqs + 1], cumulative query lengths, on the device
    seq_lens: torch.Tensor  # int32 [num_seqs], context + new tokens, on the device
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks_per_seq], padded with 0, on the device
    slot_mapping: torch.Tensor  # int64 [num_tokens], -1 = skip the write, on the device
    max_query_len: int  # host copy: largest query length in the batch (1 for a pure decode batch)
    max_seq_len: int  # host copy: largest seq_len in the batch
    num_seqs: int  # host copy of len(seq_lens)
    # int32 [n] on the device, or None: the sequences with one query token in a batch that also has
    # longer ones (a mixed step's decode rows), for a backend that runs them with decode tiles.
    decode_seq_index: torch.Tensor | None = None
    # host copy: smallest query length of a sequence in the batch (1 where unknown: a graph's rows)
    min_query_len: int = 1
    # host copy: largest cached prefix (seq_len - query length) of a sequence in the batch; None where
    # unknown (a graph's rows). 0: fresh prompts only, whose prefill needs no prefix loop.
    max_prefix_len: int | None = None


class AttentionBackend(ABC):
    """Writes a layer's new K/V into its paged cache and computes attention for the packed queries."""

    name: str = "abstract"

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Write key/value at ``meta.slot_mapping``, then attend causally over each sequence's cache."""

    def runs_eagerly(self, num_tokens: int, query_lens: list[int]) -> bool:
        """Whether a step of these query lengths (num_tokens in all) is faster run eagerly than as a
        mixed-step CUDA graph that would hold it. None is, unless the backend has such a path."""
        return False

    def decode_graph_lengths(self, num_seqs: int, num_heads: int, num_kv_heads: int, head_dim: int,
                             max_model_len: int, device: torch.device, kv_fp8: bool) -> list[int]:
        """The max_seq_len values to capture pure-decode CUDA graphs of num_seqs sequences at, ascending,
        the last max_model_len. One graph at the limit, unless the backend's launches change with the
        length (TritonAttentionBackend's split counts)."""
        return [max_model_len]
