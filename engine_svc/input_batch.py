"""The runner's persistent input batch: one row per running request, kept in place across steps.

A row holds the request's token ids, how many of them are known on the host, how many positions are
in the KV cache, its block table and its sampling parameters. A step (engine_svc/step.py StepPlan)
adds rows for new requests, appends new block ids, drops removed rows, and names the requests that
run with their token counts; packing the step is then numpy over the rows (no per-token Python, no
per-request lists rebuilt), into host staging buffers that are copied straight into the device
buffers the CUDA graphs were captured on.

Overlap (async scheduling): the step after step N is packed while N still runs, so a decode row's
input token, the one N samples, is not on the host yet. Such a position (at or past the row's
``num_known`` tokens) is fed on the device from N's sampled ids: ``gather_dst`` (token index in the
step) takes ``gather_src`` (row of N's sampled ids). When N's ids reach the host, ``complete()``
appends them to the rows they were sampled for, unless the row was dropped (or reused) meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine_svc.sampling_params import SamplingParams
from engine_svc.step import NewSeq, StepPlan

# A mixed step lists its one-token sequences for the attention backend (decode tiles for them) when
# it has at least this many: below it, the extra launch per layer costs more host time than the
# prefill tiles waste on so few rows.
MIN_LISTED_SINGLES = 32


@dataclass(slots=True)
class PackedStep:
    """One packed step (host side). Built by InputBatch.pack, read by the model runner."""

    step_id: int
    num_seqs: int  # real sequences (rows of the batch before padding)
    num_tokens: int  # real tokens
    num_rows: int  # rows after padding (a CUDA graph's batch size), else num_seqs
    padded_tokens: int  # tokens after padding, else num_tokens
    block_width: int  # block-table columns the step reads
    max_query_len: int
    min_query_len: int  # over the real sequences
    max_prefix_len: int  # over the real sequences: their tokens computed before this step
    max_seq_len: int
    num_sampled: int  # rows that sample: staging sample_idx[:num_sampled]
    num_gathered: int  # input tokens fed from the previous step's device ids: gather_dst/src[:n]
    num_singles: int  # a mixed step's one-token sequences listed in staging singles[:n] (else 0)
    sampled_rows: np.ndarray  # [num_sampled] row of each sampled request
    sampled_epochs: np.ndarray  # [num_sampled] the rows' epochs (a dropped or reused row differs)
    sampled_positions: np.ndarray  # [num_sampled] index in plan.req_ids of each sampled request
    last_token_index: np.ndarray  # [num_seqs] index of each sequence's last token in the step


class InputBatch:
    """Rows for at most max_rows live requests, and the staging buffers of one step.

    Args:
        max_rows: live requests at most (max_num_seqs).
        max_model_len: tokens per row.
        max_blocks: block-table columns per row (ceil(max_model_len / block_size)).
        block_size: KV block size in tokens.
    """

    def __init__(self, max_rows: int, max_model_len: int, max_blocks: int, block_size: int):
        self.max_rows, self.block_size = max_rows, block_size
        self.token_ids = np.zeros((max_rows, max_model_len), dtype=np.int32)
        self.num_known = np.zeros(max_rows, dtype=np.int64)  # token ids known on the host
        self.num_computed = np.zeros(max_rows, dtype=np.int64)  # positions in the KV cache
        self.block_table = np.zeros((max_rows, max_blocks), dtype=np.int32)
        self.num_blocks = np.zeros(max_rows, dtype=np.int64)
        self.epoch = np.zeros(max_rows, dtype=np.int64)  # new on every (re)assignment; -1 while free
        self.pending_step = np.full(max_rows, -1, dtype=np.int64)  # step whose sample is not on the host
        self.pending_index = np.zeros(max_rows, dtype=np.int64)  # its row in that step's sampled ids
        # Rows the argmax alone samples (greedy, no logprobs, penalties or min_tokens): all-plain
        # batches take the sampler's fast path without a per-row check.
        self.plain_greedy = np.zeros(max_rows, dtype=bool)
        self.params: list[SamplingParams | None] = [None] * max_rows
        self.prompts: list[list[int]] = [[] for _ in range(max_rows)]  # for the sampler's penalties
        self.outputs: list[list[int]] = [[] for _ in range(max_rows)]
        self.request_ids: list[str | None] = [None] * max_rows
        self.row_of: dict[str, int] = {}
        self._free_rows = list(range(max_rows - 1, -1, -1))
        self._next_epoch = 1
        self.next_step_id = 0

    # ---- rows ----

    def remove(self, request_ids: list[str]) -> list[str]:
        """Drop rows (unknown ids are ignored). Returns the ids that had rows."""
        dropped = []
        for rid in request_ids:
            row = self.row_of.pop(rid, None)
            if row is None:
                continue
            self.request_ids[row] = self.params[row] = None
            self.pending_step[row], self.epoch[row] = -1, -1
            self._free_rows.append(row)
            dropped.append(rid)
        return dropped

    def add(self, seq: NewSeq) -> None:
        assert seq.request_id not in self.row_of, f"request {seq.request_id!r} already has a row"
        row = self._free_rows.pop()
        tokens = seq.prompt_token_ids + seq.output_token_ids
        n, nb = len(tokens), len(seq.block_ids)
        self.token_ids[row, :n] = tokens
        self.num_known[row], self.num_computed[row] = n, seq.start_pos
        self.block_table[row, :nb] = seq.block_ids
        self.block_table[row, nb:] = 0  # a step reads a table only below its own blocks; zeros for tidiness
        self.num_blocks[row] = nb
        self.epoch[row], self._next_epoch = self._next_epoch, self._next_epoch + 1
        self.pending_step[row] = -1
        self.params[row], self.request_ids[row] = seq.params, seq.request_id
        self.plain_greedy[row] = _plain_greedy(seq.params)
        self.prompts[row], self.outputs[row] = list(seq.prompt_token_ids), list(seq.output_token_ids)
        self.row_of[seq.request_id] = row

    def append_blocks(self, request_id: str, block_ids: list[int]) -> None:
        row = self.row_of[request_id]
        nb = int(self.num_blocks[row])
        self.block_table[row, nb:nb + len(block_ids)] = block_ids
        self.num_blocks[row] = nb + len(block_ids)

    def apply(self, plan: StepPlan) -> list[str]:
        """Removals, then new rows, then grown tables. Returns the ids whose rows were dropped."""
        dropped = self.remove(plan.removed_ids) if plan.removed_ids else []
        for seq in plan.new_seqs:
            self.add(seq)
        for rid, blocks in plan.new_block_ids:
            self.append_blocks(rid, blocks)
        return dropped

    # ---- one step ----

    def pack(self, plan: StepPlan, st, pad_to: int | None = None, pad_tokens_to: int | None = None,
             pad_rows_to: int | None = None) -> PackedStep:
        """Pack plan's step into the staging views `st` (ids, pos, slots, qsl, lens, bt, sample_idx,
        gather_dst, gather_src, singles: numpy arrays); advance num_computed; mark sampled rows pending.

        pad_to: pad a pure-decode batch to this many one-token rows that write nowhere (slot -1).
        pad_tokens_to, pad_rows_to: a mixed graph's padding (engine_svc/cuda_graphs.py MixedGraph): tokens
        that write nowhere and belong to no row, rows without tokens, every one-token row listed in
        singles and the list padded with the last row (pad_rows_to must exceed the real rows)."""
        n = len(plan.req_ids)
        rows = np.fromiter(map(self.row_of.__getitem__, plan.req_ids), dtype=np.int64, count=n)
        q = np.array(plan.num_new_tokens, dtype=np.int64)
        start = self.num_computed[rows]
        cu = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(q, out=cu[1:])
        T = int(cu[-1])
        seq_lens = start + q
        tok_seq = np.repeat(np.arange(n), q)
        tok_row = rows[tok_seq]
        positions = np.arange(T) - cu[:-1][tok_seq] + start[tok_seq]
        st.ids[:T] = self.token_ids[tok_row, positions]
        st.pos[:T] = positions
        bs = self.block_size
        st.slots[:T] = self.block_table[tok_row, positions // bs].astype(np.int64) * bs + positions % bs
        # Positions past what the host knows: the previous step's samples, fed on the device.
        unknown = np.flatnonzero(positions >= self.num_known[tok_row])
        num_gathered = len(unknown)
        if num_gathered:
            src_rows = tok_row[unknown]
            assert (self.pending_step[src_rows] == self.next_step_id - 1).all(), \
                "an input token is neither on the host nor sampled by the previous step"
            st.gather_dst[:num_gathered] = unknown
            st.gather_src[:num_gathered] = self.pending_index[src_rows]
        width = max(1, int(self.num_blocks[rows].max()))
        R = pad_to or n
        st.bt[:n, :width] = self.block_table[rows, :width]
        st.qsl[:n + 1] = cu
        st.lens[:n] = seq_lens
        if pad_to:
            st.ids[T:pad_to], st.pos[T:pad_to], st.slots[T:pad_to] = 0, 0, -1
            st.qsl[n + 1:pad_to + 1] = T + np.arange(1, pad_to - n + 1)
            st.lens[n:pad_to] = 1
            st.bt[n:pad_to, :width] = 0
        elif pad_tokens_to:
            assert pad_rows_to and pad_rows_to > n, "a mixed graph needs an empty last row"
            R = pad_rows_to
            st.ids[T:pad_tokens_to], st.pos[T:pad_tokens_to], st.slots[T:pad_tokens_to] = 0, 0, -1
            st.qsl[n + 1:R + 1] = T
            st.lens[n:R] = 0
        num_singles = 0
        if T > n or pad_rows_to:  # a mixed step lists its one-token rows, for decode tiles
            singles = np.flatnonzero(q == 1)
            st.singles[:len(singles)] = singles
            if pad_rows_to:  # a mixed graph: always, padded to its fixed length with the empty last row
                st.singles[len(singles):R] = R - 1
                num_singles = R
            elif len(singles) >= MIN_LISTED_SINGLES:  # eager: when worth the extra launch per layer
                num_singles = len(singles)
        sampled = np.flatnonzero(np.array(plan.sample, dtype=bool))
        k = len(sampled)
        last = cu[1:] - 1
        st.sample_idx[:k] = last[sampled]
        sampled_rows = rows[sampled]
        step_id = self.next_step_id
        self.next_step_id += 1
        self.num_computed[rows] = seq_lens
        self.pending_step[sampled_rows] = step_id
        self.pending_index[sampled_rows] = np.arange(k)
        return PackedStep(
            step_id=step_id, num_seqs=n, num_tokens=T, num_rows=R, padded_tokens=pad_to or pad_tokens_to or T,
            block_width=width, max_query_len=int(q.max()), min_query_len=int(q.min()),
            max_prefix_len=int(start.max()), max_seq_len=int(seq_lens.max()), num_sampled=k,
            num_gathered=num_gathered, num_singles=num_singles, sampled_rows=sampled_rows,
            sampled_epochs=self.epoch[sampled_rows],
            sampled_positions=sampled, last_token_index=last)

    def complete(self, step: PackedStep, token_ids: list[int]) -> None:
        """Step `step`'s sampled ids reached the host: append them to rows still owned by the same
        request (a row dropped or reassigned since has a different epoch)."""
        if not token_ids:
            return
        rows, toks = step.sampled_rows, np.asarray(token_ids, dtype=np.int64)
        live = self.epoch[rows] == step.sampled_epochs
        rows, toks = rows[live], toks[live]
        n = self.num_known[rows]
        fits = n < self.token_ids.shape[1]  # a discarded token past max_model_len stays off the table
        self.token_ids[rows[fits], n[fits]] = toks[fits]
        self.num_known[rows[fits]] += 1
        for row, tok in zip(rows.tolist(), toks.tolist()):
            self.outputs[row].append(tok)
        mine = rows[self.pending_step[rows] == step.step_id]
        self.pending_step[mine] = -1


def _plain_greedy(p: SamplingParams) -> bool:
    return (p.temperature == 0.0 and not p.logprobs and not p.top_logprobs and p.repetition_penalty == 1.0
            and not p.presence_penalty and not p.frequency_penalty and p.min_tokens == 0)
