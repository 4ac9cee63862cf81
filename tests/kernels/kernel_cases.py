"""Random paged-attention batches for the kernel tests (CPU interpreter and GPU alike)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Batch:
    query: torch.Tensor  # [T, H, D], a strided view of a fused qkv tensor
    key: torch.Tensor  # [T, Hkv, D], the new tokens' K (already in the cache)
    value: torch.Tensor
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]; unused slots hold NaN
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # int32 [S, max_blocks], a column slice of a wider table
    query_start_loc: torch.Tensor  # int32 [S + 1]
    seq_lens: torch.Tensor  # int32 [S]
    slot_mapping: torch.Tensor  # int64 [T]
    max_query_len: int
    max_seq_len: int

    def args(self):
        return (self.query, self.k_cache, self.v_cache, self.block_tables, self.query_start_loc,
                self.seq_lens, self.max_query_len, self.max_seq_len)


def make_batch(seqs, *, num_kv_heads: int, qpk: int, head_dim: int, block_size: int,
               dtype=torch.float32, device="cpu", spare_blocks: int = 3, gen=None) -> Batch:
    """A batch of sequences given as (context_len, query_len) pairs.

    Blocks are drawn from a shuffled pool so tables are non-contiguous, and the cache's last block is
    always used by some sequence (exercising large block offsets). Positions no sequence owns are NaN,
    so a kernel that reads outside what it should produces NaN.
    """
    gen = gen or torch.Generator().manual_seed(torch.seed() % 2**31)
    num_heads = num_kv_heads * qpk
    blocks_per_seq = [-(-(c + q) // block_size) for c, q in seqs]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    pool.remove(num_blocks - 1)
    pool.insert(0, num_blocks - 1)  # first sequence's first block is the last block of the cache
    max_blocks = max(blocks_per_seq)
    wide = torch.zeros(len(seqs), max_blocks + 5, dtype=torch.int32)
    tables = []
    for s, n in enumerate(blocks_per_seq):
        tables.append(pool[:n])
        wide[s, :n] = torch.tensor(pool[:n], dtype=torch.int32)
        pool = pool[n:]
    block_tables = wide.to(device)[:, :max_blocks]  # row stride max_blocks + 5: not contiguous

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype, device=device)
    v_cache = torch.full_like(k_cache, float("nan"))
    q_lens = [q for _, q in seqs]
    num_tokens = sum(q_lens)
    qkv = rnd(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim)
    query = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    key = qkv[:, num_heads * head_dim: (num_heads + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    value = qkv[:, (num_heads + num_kv_heads) * head_dim:].view(num_tokens, num_kv_heads, head_dim)
    slots = []
    t = 0
    for (ctx, q), table in zip(seqs, tables):
        pos = torch.arange(ctx + q)
        all_slots = torch.tensor(table)[pos // block_size] * block_size + pos % block_size
        blk, off = all_slots // block_size, all_slots % block_size
        k_cache[blk[:ctx], off[:ctx]] = rnd(ctx, num_kv_heads, head_dim)  # cached prefix
        v_cache[blk[:ctx], off[:ctx]] = rnd(ctx, num_kv_heads, head_dim)
        k_cache[blk[ctx:], off[ctx:]] = key[t: t + q]  # this step's tokens, written first
        v_cache[blk[ctx:], off[ctx:]] = value[t: t + q]
        slots.append(all_slots[ctx:])
        t += q
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    seq_lens = torch.tensor([c + q for c, q in seqs], dtype=torch.int32, device=device)
    return Batch(query, key, value, k_cache, v_cache, block_tables, qsl, seq_lens,
                 torch.cat(slots).to(device), max(q_lens), max(c + q for c, q in seqs))


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype) -> None:
    """Every element written and finite; relative error within the dtype's budget."""
    assert not out.isnan().any(), f"{int(out.isnan().sum())} of {out.numel()} outputs NaN (unwritten?)"
    err = (out.double() - ref.double()).norm() / ref.double().norm()
    budget = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert err < budget, f"relative error {err:.2e} > {budget:.0e}"
    max_abs = (out.double() - ref.double()).abs().max().item()
    assert max_abs < 50 * budget * ref.abs().max().item() + 1e-6, f"max abs error {max_abs:.2e}"
