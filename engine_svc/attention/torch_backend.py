"""Paged attention in plain PyTorch: the CPU backend, and the fallback wherever Triton is unavailable.

Same cache layout and metadata as the Triton backend (see base.py). Decode sequences (one query
token) are handled together in one batched gather + matmul; sequences with several query tokens
(prefill chunks) are handled one by one, since padding them to a common length would waste
O(batch * longest chunk) work. Scores and softmax run in fp32 whatever the cache dtype.

It gathers whole blocks and masks scores afterwards, so cache slots past a sequence's length must
hold finite values (stale K/V or zeros: the runner zero-fills the cache; 0 * NaN would be NaN).

An float8_e4m3fn cache (--kv-cache-dtype fp8) holds K/V / scale rounded to e4m3 and saturated to +-448,
as the Triton kernels write it; it is moved through uint8 views (torch has no CPU indexing kernels for
float8) and dequantised to fp32 after the gather.
"""

from __future__ import annotations

import torch

from kvmesh.blocks import blocks_for

from engine_svc.attention.base import AttentionBackend, AttentionMetadata

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _as_stored(x: torch.Tensor, cache: torch.Tensor, scale: float) -> torch.Tensor:
    """x in the cache's storage form: itself, or for an FP8 cache x / scale in e4m3 seen as uint8."""
    if cache.dtype != torch.float8_e4m3fn:
        return x
    return (x.float() * (1.0 / scale)).clamp(-FP8_MAX, FP8_MAX).to(cache.dtype).view(torch.uint8)


def _storage(cache: torch.Tensor) -> torch.Tensor:
    return cache.view(torch.uint8) if cache.dtype == torch.float8_e4m3fn else cache


def write_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Scatter key/value [T, KVH, D] into the caches at slot_mapping [T] (slots < 0 are skipped);
    FP8 caches get x / scale rounded to e4m3."""
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    k_flat = _storage(k_cache).view(num_slots, *k_cache.shape[2:])  # [num_blocks * block_size, KVH, D]
    v_flat = _storage(v_cache).view(num_slots, *v_cache.shape[2:])
    key, value = _as_stored(key, k_cache, k_scale), _as_stored(value, v_cache, v_scale)
    keep = slot_mapping >= 0
    if bool(keep.all()):
        k_flat.index_copy_(0, slot_mapping, key)
        v_flat.index_copy_(0, slot_mapping, value)
    else:
        slots = slot_mapping[keep]
        k_flat.index_copy_(0, slots, key[keep])
        v_flat.index_copy_(0, slots, value[keep])


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
            scale: float) -> torch.Tensor:
    """Grouped-query attention without repeating K/V.

    q: [S, Lq, H, D]; k, v: [S, Lk, KVH, D]; mask: [S, Lq, Lk] (True = attend) -> [S, Lq, H, D].
    """
    s, lq, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    # Query heads h = kv_head * g + j share kv_head: fold (j, Lq) into one row axis per KV head.
    qg = q.float().view(s, lq, kvh, g, d).permute(0, 2, 3, 1, 4).reshape(s, kvh, g * lq, d)
    kt = k.float().permute(0, 2, 3, 1)  # [S, KVH, D, Lk]
    scores = torch.matmul(qg, kt) * scale  # [S, KVH, g*Lq, Lk]
    scores = scores.view(s, kvh, g, lq, -1).masked_fill(~mask[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(s, kvh, g * lq, -1)
    out = torch.matmul(probs, v.float().permute(0, 2, 1, 3))  # [S, KVH, g*Lq, D]
    return out.view(s, kvh, g, lq, d).permute(0, 3, 1, 2, 4).reshape(s, lq, h, d).to(q.dtype)


def _gather_context(cache: torch.Tensor, block_tables: torch.Tensor, num_blocks: int,
                    scale: float = 1.0) -> torch.Tensor:
    """cache [NB, BS, KVH, D], block_tables [S, >=num_blocks] -> [S, num_blocks * BS, KVH, D]
    (an FP8 cache comes back dequantised, in fp32)."""
    g = _storage(cache)[block_tables[:, :num_blocks]]  # [S, num_blocks, BS, KVH, D]
    if cache.dtype == torch.float8_e4m3fn:
        g = g.view(cache.dtype).float() * scale
    return g.view(g.shape[0], -1, *cache.shape[2:])


class TorchAttentionBackend(AttentionBackend):
    name = "torch"
    supports_cuda_graphs = False  # reads per-sequence lengths on the host
    k_scale = v_scale = 1.0  # FP8 caches: per-tensor scales (vLLM's default without calibrated ones)

    def forward(self, query, key, value, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                sliding_window: int | None = None) -> torch.Tensor:
        write_kv(key, value, k_cache, v_cache, meta.slot_mapping, self.k_scale, self.v_scale)
        out = torch.empty_like(query)
        block_size = k_cache.shape[1]
        qsl = meta.query_start_loc.tolist()
        seq_lens = meta.seq_lens.tolist()
        decode = [i for i in range(meta.num_seqs) if qsl[i + 1] - qsl[i] == 1]
        prefill = [i for i in range(meta.num_seqs) if qsl[i + 1] - qsl[i] > 1]
        if decode:
            out_rows = self._decode(query, k_cache, v_cache, meta, scale, sliding_window, decode,
                                    qsl, seq_lens, block_size)
            out[out_rows[0]] = out_rows[1]
        for i in prefill:
            start, end, seq_len = qsl[i], qsl[i + 1], seq_lens[i]
            nb = blocks_for(seq_len, block_size)
            bt = meta.block_tables[i:i + 1]
            k = _gather_context(k_cache, bt, nb, self.k_scale)[:, :seq_len]  # [1, L, KVH, D]
            v = _gather_context(v_cache, bt, nb, self.v_scale)[:, :seq_len]
            q_pos = torch.arange(seq_len - (end - start), seq_len, device=query.device)[:, None]
            k_pos = torch.arange(seq_len, device=query.device)[None, :]
            mask = k_pos <= q_pos  # [Lq, L]
            if sliding_window is not None:
                mask &= k_pos > q_pos - sliding_window
            out[start:end] = _attend(query[None, start:end], k, v, mask[None], scale)[0]
        return out

    def _decode(self, query, k_cache, v_cache, meta, scale, sliding_window, rows, qsl, seq_lens, block_size):
        """All one-token sequences at once: returns (token indices, outputs [n, H, D])."""
        device = query.device
        idx = torch.tensor(rows, device=device)
        tok = torch.tensor([qsl[i] for i in rows], device=device)
        lens = torch.tensor([seq_lens[i] for i in rows], device=device)
        max_len = max(seq_lens[i] for i in rows)
        nb = blocks_for(max_len, block_size)
        bt = meta.block_tables[idx]
        k = _gather_context(k_cache, bt, nb, self.k_scale)  # [n, nb * BS, KVH, D]
        v = _gather_context(v_cache, bt, nb, self.v_scale)
        k_pos = torch.arange(k.shape[1], device=device)[None, :]
        mask = k_pos < lens[:, None]  # [n, Lk]; the query sits at position len - 1
        if sliding_window is not None:
            mask &= k_pos > (lens[:, None] - 1 - sliding_window)
        out = _attend(query[tok][:, None], k, v, mask[:, None, :], scale)  # [n, 1, H, D]
        return tok, out[:, 0]
