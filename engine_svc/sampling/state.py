"""Per-request sampling state in persistent device tensors, one slot per known request id.

A request's parameters, its seed, its step counter (tokens generated so far) and, when it uses
penalties, its prompt mask and output token counts are written once, when the request joins, from
its SampleRequest. After that the device copy is the truth: the sampler advances the counter and the
counts with the tokens it sampled itself, and the token ids of later SampleRequests are not read
(under overlap the newest may be a placeholder). Only their number is: a row is the request its slot
holds while its SamplingParams object is the same object (the engine keeps one per request) and
len(output_token_ids) equals the slot's count of sampled tokens. Otherwise (a new request under a
reused id, a history the engine changed, a row back after its slot was dropped) the row rejoins and
its state is rebuilt from the histories, which must then be complete.

Slots of requests absent from the current call are dropped lazily, least recently used first, when
a joining request needs a slot; forget() drops them at once. Capacity doubles when every slot is in
the current call. Rows with penalties also hold a row of the [rows, V] tables, which grow to what
the joining rows need (in steps of 16 rows: at 128256 ids a row of mask and counts is 641 KB).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import torch

from engine_svc.sampling_params import MAX_STOP_TOKEN_IDS, SamplingParams

# Columns of the per-slot parameter tables.
F_TEMPERATURE, F_TOP_P, F_MIN_P, F_REPETITION, F_PRESENCE, F_FREQUENCY = range(6)
I_SEED, I_GREEDY, I_TOP_K, I_MIN_TOKENS, I_TABLE_ROW = range(5)
NUM_F, NUM_I = 6, 5
TOP_P_IN_TOP_K_MAX = 1024  # above this, topk() costs about what the full sort does
TRASH_TABLE_ROW = 0  # counts of rows without penalties go here (never read): one scatter for all rows


_request_id = operator.attrgetter("request_id")
_params = operator.attrgetter("params")
_output_ids = operator.attrgetter("output_token_ids")


def _column(params: torch.Tensor, col: int) -> torch.Tensor:
    """One parameter of every row as its own tensor, in fresh storage. Not .contiguous(): for a single
    row that returns the view itself, 8 * col bytes into the row, and Triton specialises pointers on
    16-byte alignment, so a batch of one row compiled another gumbel_argmax variant in the middle of
    serving (bench/results/step-profile-llama3-8b-h200-2026-12-01-7022bd1.json names it)."""
    return params[:, col].clone()


@dataclass(slots=True)
class BatchView:
    """The state of one batch composition, gathered in row order; reused while the batch repeats."""

    request_ids: list[str]
    params: list[SamplingParams]
    slots_np: np.ndarray  # [rows] int64
    slots: torch.Tensor  # [rows] int64, device
    fparams: torch.Tensor  # [rows, NUM_F] fp32
    seeds: torch.Tensor  # [rows] int64
    greedy: torch.Tensor  # [rows] int64: 1 = argmax
    top_k: torch.Tensor  # [rows] int64: 0 = off
    min_tokens: torch.Tensor  # [rows] int64: 0 = off (also when the row has no stop ids)
    table_rows: torch.Tensor  # [rows] int64: penalty table row, -1 = none
    count_rows: torch.Tensor  # [rows] int64: table row to count sampled tokens in (TRASH_TABLE_ROW = none)
    stop_ids: torch.Tensor  # [rows, S] int64: ids suppressed while min_tokens is not reached (padded)
    min_tokens_np: np.ndarray  # [rows]
    all_greedy: bool
    any_temperature: bool  # some row divides by a temperature other than 1
    max_top_k: int
    any_top_p_in_top_k: bool
    top_p_in_top_k: torch.Tensor  # [rows] bool: top-p with a top-k <= TOP_P_IN_TOP_K_MAX (no full sort)
    top_p_sort_rows: torch.Tensor | None  # [n] int64: the other top-p rows (a full sort); None: none
    top_p_sort_all: bool  # ... and they are all the rows
    any_min_p: bool
    any_penalty: bool
    any_min_tokens: bool
    max_top_logprobs: int
    any_logprobs: bool
    want_logprobs: list[bool]  # per row
    top_logprobs: list[int]  # per row

    def same_batch(self, request_ids: list[str], params: list[SamplingParams]) -> bool:
        return request_ids == self.request_ids and all(map(operator.is_, params, self.params))


class RequestStates:
    """The slots, the device tables and their host mirrors (for batch-wide flags without a sync)."""

    def __init__(self, vocab_size: int, device: torch.device, eos_token_ids: list[int],
                 generator: torch.Generator, capacity: int = 16):
        self.vocab_size = vocab_size
        self.device = device
        self.eos_token_ids = sorted(set(eos_token_ids))
        self.generator = generator  # host: seeds for unseeded requests, drawn when they join
        self.stop_width = MAX_STOP_TOKEN_IDS + len(self.eos_token_ids)
        self.slot_of: dict[str, int] = {}
        self.capacity = 0
        self._empty_slot_tables()
        self.num_calls = 0
        self.view: BatchView | None = None
        self._grow_slots(capacity)
        self.num_table_rows = 0  # the [rows, V] penalty tables are made when a request first needs them
        self.free_table_rows: list[int] = []
        self.prompt_mask = torch.zeros((0, vocab_size), dtype=torch.bool, device=device)
        self.output_counts = torch.zeros((0, vocab_size), dtype=torch.int32, device=device)

    # ---- capacity ----

    def _empty_slot_tables(self) -> None:
        dev, none = self.device, np.zeros(0, dtype=np.int64)
        self.fparams = torch.zeros((0, NUM_F), device=dev)
        self.iparams = torch.zeros((0, NUM_I), dtype=torch.int64, device=dev)
        self.num_generated = torch.zeros(0, dtype=torch.int64, device=dev)
        self.stop_ids = torch.zeros((0, self.stop_width), dtype=torch.int64, device=dev)
        self.num_generated_np, self.min_tokens_np, self.table_row_of, self.last_call = none, none, none, none
        self.params_of: list[SamplingParams | None] = []
        self.id_of: list[str | None] = []
        self.free_slots: list[int] = []

    def _grow_slots(self, capacity: int) -> None:
        """Resize every per-slot table to `capacity` slots, keeping the slots in use."""
        old = self.capacity

        def grown(t: torch.Tensor, shape, dtype) -> torch.Tensor:
            new = torch.zeros(shape, dtype=dtype, device=self.device)
            if old:
                new[:old] = t
            return new

        def grown_np(a: np.ndarray, fill: int) -> np.ndarray:
            new = np.full(capacity, fill, dtype=np.int64)
            if old:
                new[:old] = a
            return new

        self.fparams = grown(self.fparams, (capacity, NUM_F), torch.float32)
        self.iparams = grown(self.iparams, (capacity, NUM_I), torch.int64)
        self.num_generated = grown(self.num_generated, (capacity,), torch.int64)
        self.stop_ids = grown(self.stop_ids, (capacity, self.stop_width), torch.int64)
        self.ones = torch.ones(capacity, dtype=torch.int64, device=self.device)
        self.ones32 = torch.ones(capacity, dtype=torch.int32, device=self.device)
        # Host mirrors: batch-wide decisions (min_tokens still active?) without reading the device.
        self.num_generated_np = grown_np(self.num_generated_np, 0)
        self.min_tokens_np = grown_np(self.min_tokens_np, 0)
        self.table_row_of = grown_np(self.table_row_of, -1)
        self.last_call = grown_np(self.last_call, 0)
        self.params_of += [None] * (capacity - old)
        self.id_of += [None] * (capacity - old)
        self.free_slots += list(range(capacity - 1, old - 1, -1))
        self.capacity = capacity

    def _grow_tables(self, rows: int) -> None:
        """[rows, V] prompt mask and output counts; row TRASH_TABLE_ROW is never handed out."""
        old = self.num_table_rows
        mask = torch.zeros((rows, self.vocab_size), dtype=torch.bool, device=self.device)
        counts = torch.zeros((rows, self.vocab_size), dtype=torch.int32, device=self.device)
        if old:
            mask[:old] = self.prompt_mask
            counts[:old] = self.output_counts
        self.prompt_mask, self.output_counts = mask, counts
        self.free_table_rows += list(range(rows - 1, max(old, 1) - 1, -1))
        self.num_table_rows = rows

    def _upload(self, a: np.ndarray) -> torch.Tensor:
        """Host array -> device tensor without waiting: a pageable H2D copy would first wait for the
        whole stream (it would stall the runner's overlap at every batch change)."""
        t = torch.from_numpy(np.ascontiguousarray(a))
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    # ---- joining, leaving ----

    def forget(self, request_ids) -> None:
        for rid in request_ids:
            slot = self.slot_of.pop(rid, None)
            if slot is not None:
                self._release(slot)

    def _release(self, slot: int) -> None:
        row = int(self.table_row_of[slot])
        if row >= 0:
            self.free_table_rows.append(row)
            self.table_row_of[slot] = -1
        self.params_of[slot] = None
        self.id_of[slot] = None
        self.free_slots.append(slot)
        self.view = None  # a cached view may name the slot

    def prepare(self, reqs) -> BatchView:
        """The batch's view: rows join where needed; a repeated batch costs a few C-level list passes."""
        ids = list(map(_request_id, reqs))
        params = list(map(_params, reqs))
        lens = np.fromiter(map(len, map(_output_ids, reqs)), dtype=np.int64, count=len(reqs))
        self.num_calls += 1
        view = self.view
        if view is not None and view.same_batch(ids, params) and (
                lens == self.num_generated_np[view.slots_np]).all():
            self.last_call[view.slots_np] = self.num_calls
            return view
        if len(set(ids)) != len(ids):
            raise ValueError("a request id appears twice in one sampler call")
        joining = [i for i, (rid, p) in enumerate(zip(ids, params)) if not self._current(rid, p, lens[i])]
        for i in joining:  # a stale slot under a joining id (new request, or history changed) goes
            if (s := self.slot_of.pop(ids[i], None)) is not None:
                self._release(s)
        in_batch = [self.slot_of[rid] for rid in ids if rid in self.slot_of]
        self.last_call[in_batch] = self.num_calls
        self._make_room(len(joining), len(ids))
        if joining:
            self._join([reqs[i] for i in joining])
        slots = np.array([self.slot_of[rid] for rid in ids], dtype=np.int64)
        self.last_call[slots] = self.num_calls
        self.view = self._gather(ids, params, slots)
        return self.view

    def _current(self, request_id: str, params: SamplingParams, num_output: int) -> bool:
        """Does the slot under this id hold this request, at this many generated tokens?"""
        slot = self.slot_of.get(request_id)
        return slot is not None and self.params_of[slot] is params and self.num_generated_np[slot] == num_output

    def _make_room(self, num_joining: int, num_rows: int) -> None:
        short = num_joining - len(self.free_slots)
        if short <= 0:
            return
        absent = [s for s in self.slot_of.values() if self.last_call[s] != self.num_calls]
        for slot in sorted(absent, key=lambda s: self.last_call[s])[:short]:
            del self.slot_of[self.id_of[slot]]
            self._release(slot)
        if num_joining > len(self.free_slots):
            self._grow_slots(max(2 * self.capacity, num_rows))

    def _join(self, reqs) -> None:
        """Write the joining rows' parameters, seeds, counters and penalty tables (per-row Python)."""
        n = len(reqs)
        slots = [self.free_slots.pop() for _ in range(n)]
        fresh = torch.randint(0, 2**63 - 1, (n,), generator=self.generator).tolist()
        f = np.zeros((n, NUM_F), dtype=np.float32)
        i = np.zeros((n, NUM_I), dtype=np.int64)
        stops = np.zeros((n, self.stop_width), dtype=np.int64)
        short = sum(map(self._has_penalty, (r.params for r in reqs))) - len(self.free_table_rows)
        if short > 0:  # grow once, to what is needed (plus the trash row), rounded up to 16 rows
            self._grow_tables(-(-(max(self.num_table_rows, 1) + short) // 16) * 16)
        pen = []
        for k, (r, slot) in enumerate(zip(reqs, slots)):
            self.slot_of[r.request_id] = slot
            self.id_of[slot] = r.request_id
            self.params_of[slot] = r.params
            f[k], i[k], stops[k] = self._row(r.params, fresh[k])
            self.min_tokens_np[slot] = i[k, I_MIN_TOKENS]
            if self._has_penalty(r.params):
                row = self.free_table_rows.pop()
                self.table_row_of[slot] = row
                pen.append((row, r))
            i[k, I_TABLE_ROW] = self.table_row_of[slot]
            self.num_generated_np[slot] = len(r.output_token_ids)
        idx = self._upload(np.array(slots, dtype=np.int64))
        self.fparams[idx] = self._upload(f)
        self.iparams[idx] = self._upload(i)
        self.stop_ids[idx] = self._upload(stops)
        self.num_generated[idx] = self._upload(self.num_generated_np[slots])
        if pen:
            self._fill_tables(pen)

    def _row(self, p: SamplingParams, fresh_seed: int):
        greedy = p.greedy
        V = self.vocab_size
        f = [1.0, 1.0, 0.0, p.repetition_penalty, p.presence_penalty, p.frequency_penalty]
        top_k = 0
        if not greedy:  # greedy rows are never truncated (truncation always keeps the argmax anyway)
            f[F_TEMPERATURE], f[F_TOP_P], f[F_MIN_P] = p.temperature, p.top_p, p.min_p
            top_k = p.top_k if 0 < p.top_k < V else 0
        stop_set = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_token_ids))
        stops = sorted(stop_set)
        min_tokens = p.min_tokens if stops else 0  # nothing to suppress
        # Pad with the first id: duplicate scatter targets then always receive the same value.
        stops = (stops + [stops[0]] * (self.stop_width - len(stops))) if stops else [0] * self.stop_width
        seed = p.seed if p.seed is not None else fresh_seed
        return f, [seed, int(greedy), top_k, min_tokens, -1], stops

    @staticmethod
    def _has_penalty(p: SamplingParams) -> bool:
        return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0

    def _fill_tables(self, pen) -> None:
        """Rebuild the joining rows' prompt mask and output counts from their histories."""
        rows = self._upload(np.array([row for row, _ in pen], dtype=np.int64))
        self.prompt_mask[rows] = False
        self.output_counts[rows] = 0
        pr = np.concatenate([np.full(len(r.prompt_token_ids), row) for row, r in pen]).astype(np.int64)
        pc = np.concatenate([np.asarray(r.prompt_token_ids, dtype=np.int64) for _, r in pen])
        orow = np.concatenate([np.full(len(r.output_token_ids), row) for row, r in pen]).astype(np.int64)
        oc = np.concatenate([np.asarray(r.output_token_ids, dtype=np.int64) for _, r in pen])
        if pr.size:
            self.prompt_mask[self._upload(pr), self._upload(pc)] = True
        if orow.size:
            ones = torch.ones(orow.size, dtype=torch.int32, device=self.device)
            self.output_counts.index_put_((self._upload(orow),
                                           self._upload(oc)), ones, accumulate=True)

    # ---- the batch view, and advancing it ----

    def _gather(self, ids, params, slots_np: np.ndarray) -> BatchView:
        slots = self._upload(slots_np)
        f = self.fparams[slots]
        i = self.iparams[slots]
        greedy = [p.greedy for p in params]
        sampled = [p for p, g in zip(params, greedy) if not g]
        table_rows = _column(i, I_TABLE_ROW)
        want = [bool(p.logprobs or p.top_logprobs) for p in params]
        top = [p.top_logprobs for p in params]
        min_tokens_np = self.min_tokens_np[slots_np]
        max_top_k = max((p.top_k if 0 < p.top_k < self.vocab_size else 0 for p in sampled), default=0)
        in_k = [not g and p.top_p < 1.0 and 0 < p.top_k <= min(TOP_P_IN_TOP_K_MAX, self.vocab_size - 1)
                for p, g in zip(params, greedy)]
        sort_rows = [i for i, (p, g, k) in enumerate(zip(params, greedy, in_k)) if not g and p.top_p < 1.0 and not k]
        return BatchView(
            request_ids=ids, params=params, slots_np=slots_np, slots=slots, fparams=f,
            seeds=_column(i, I_SEED), greedy=_column(i, I_GREEDY),
            top_k=_column(i, I_TOP_K), min_tokens=_column(i, I_MIN_TOKENS),
            table_rows=table_rows, count_rows=table_rows.clamp(min=TRASH_TABLE_ROW),
            stop_ids=self.stop_ids[slots], min_tokens_np=min_tokens_np,
            all_greedy=not sampled, any_temperature=any(p.temperature != 1.0 for p in sampled),
            max_top_k=max_top_k, any_top_p_in_top_k=any(in_k),
            top_p_in_top_k=self._upload(np.array(in_k, dtype=bool)),
            top_p_sort_rows=self._upload(np.array(sort_rows, dtype=np.int64)) if sort_rows else None,
            top_p_sort_all=len(sort_rows) == len(params),
            any_min_p=any(p.min_p > 0.0 for p in sampled),
            any_penalty=any(map(self._has_penalty, params)), any_min_tokens=bool(min_tokens_np.any()),
            max_top_logprobs=min(max(top, default=0), self.vocab_size), any_logprobs=any(want),
            want_logprobs=want, top_logprobs=top)

    def min_tokens_active(self, view: BatchView) -> bool:
        return view.any_min_tokens and bool((self.num_generated_np[view.slots_np] < view.min_tokens_np).any())

    def steps(self, view: BatchView) -> torch.Tensor:
        """[rows] int64 on the device: tokens each row has generated before this call."""
        return self.num_generated[view.slots]

    def advance(self, view: BatchView, tokens: torch.Tensor) -> None:
        """Count the tokens just sampled (device), and the step on the host mirror."""
        rows = view.slots_np.shape[0]
        self.num_generated.index_add_(0, view.slots, self.ones[:rows])
        self.num_generated_np[view.slots_np] += 1
        if view.any_penalty:
            self.output_counts.index_put_((view.count_rows, tokens), self.ones32[:rows], accumulate=True)
