"""TritonAttentionBackend against the engine's CPU backend on the same step."""

from __future__ import annotations

import torch
from kernel_cases import DEVICE, assert_close, make_batch

from engine_svc.attention.base import AttentionMetadata
from engine_svc.attention.torch_backend import TorchAttentionBackend
from engine_svc.attention.triton_backend import TritonAttentionBackend


def test_backend_matches_torch_backend():
    seqs = [(0, 7), (16, 1), (9, 4), (33, 1)]
    b = make_batch(seqs, num_kv_heads=2, qpk=2, head_dim=64, block_size=16, device=DEVICE)
    # The torch backend gathers whole blocks and masks scores, so it needs finite values in slots it
    # does not use (the runner zero-fills the cache); the step's own K/V are not in the cache yet:
    # each backend must write them first.
    b.k_cache.nan_to_num_(0.0)
    b.v_cache.nan_to_num_(0.0)
    b.k_cache.view(-1, 2, 64)[b.slot_mapping] = float("nan")
    b.v_cache.view(-1, 2, 64)[b.slot_mapping] = float("nan")
    meta = AttentionMetadata(b.query_start_loc, b.seq_lens, b.block_tables, b.slot_mapping, b.max_query_len,
                             b.max_seq_len, len(seqs))
    caches = [(b.k_cache.clone(), b.v_cache.clone()) for _ in range(2)]
    out = TritonAttentionBackend().forward(b.query, b.key, b.value, *caches[0], meta, 0.125, None)
    ref = TorchAttentionBackend().forward(b.query, b.key, b.value, *caches[1], meta, 0.125, None)
    assert_close(out, ref, torch.float32)
    assert torch.equal(caches[0][0].nan_to_num(3.0), caches[1][0].nan_to_num(3.0))
