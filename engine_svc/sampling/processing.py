"""The logits processing steps, each in place on the [rows, V] fp32 logits of one batch view.

Every step reads its per-row parameters from device tensors of the BatchView and its on/off switch
from the view's host flags, so no step looks at a row in Python or reads the device.
"""

from __future__ import annotations

import torch

from engine_svc.sampling.state import F_MIN_P, F_REPETITION, F_TEMPERATURE, F_TOP_P, BatchView, RequestStates
from kernels.sampling import gumbel_argmax, gumbel_argmax_reference
from kernels.sampling_penalties import apply_penalties, apply_penalties_reference

NEG_INF = float("-inf")


def penalize(x: torch.Tensor, view: BatchView, states: RequestStates, use_triton: bool) -> None:
    """Repetition (prompt + output tokens), then frequency / presence (output tokens)."""
    fn = apply_penalties if use_triton else apply_penalties_reference
    fn(x, view.table_rows, view.fparams[:, F_REPETITION:], states.prompt_mask, states.output_counts)


def suppress_stops(x: torch.Tensor, view: BatchView, steps: torch.Tensor) -> None:
    """min_tokens: the row's stop ids (and EOS unless ignore_eos) are -inf until enough were generated.

    The stop table is padded with each row's first id, so duplicate targets get the same value."""
    active = (steps < view.min_tokens)[:, None]
    values = x.gather(1, view.stop_ids).masked_fill_(active, NEG_INF)
    x.scatter_(1, view.stop_ids, values)


def divide_by_temperature(x: torch.Tensor, view: BatchView) -> None:
    x.div_(view.fparams[:, F_TEMPERATURE, None])  # greedy rows hold 1


def truncate(x: torch.Tensor, view: BatchView) -> None:
    """top-k (keep >= the k-th largest), then top-p (drop the low tail of mass <= 1 - p), then min-p.

    Greedy rows hold top_k 0, top_p 1, min_p 0: they are left as they are."""
    top = kth = None
    if view.max_top_k:
        k = view.top_k
        top = x.topk(view.max_top_k, dim=-1).values  # descending
        kth = top.gather(1, (k - 1).clamp(min=0)[:, None])
        kth.masked_fill_(k[:, None] == 0, NEG_INF)
        x.masked_fill_(x < kth, NEG_INF)
    if view.any_top_p_in_top_k:
        _top_p_among_top_k(x, view, top, kth)
    if view.top_p_sort_rows is not None:
        _top_p_sorted(x, view)
    if view.any_min_p:
        probs = x.softmax(dim=-1)
        x.masked_fill_(probs < view.fparams[:, F_MIN_P, None] * probs.amax(dim=-1, keepdim=True), NEG_INF)


def _top_p_among_top_k(x: torch.Tensor, view: BatchView, top: torch.Tensor, kth: torch.Tensor) -> None:
    """top-p for the rows that also have a top-k (view.top_p_in_top_k): the nucleus lies in the top-k
    list that topk() already sorted, so no [rows, V] sort. Keeps a token while the mass before it < p
    (the sort path's rule, "drop where the ascending cumulative mass <= 1 - p") as a threshold on
    values: tokens tied with the last one kept are kept too. The mass is normalised over everything
    top-k kept (one logsumexp over the row), so ties beyond the list still count. Which path a row
    takes depends on its own parameters only, so its draws do not depend on the batch."""
    p = view.fparams[:, F_TOP_P, None]
    vals = top.masked_fill(top < kth, NEG_INF)
    probs = (vals - torch.logsumexp(x, dim=-1, keepdim=True)).exp_()
    before = probs.cumsum(dim=-1).sub_(probs)
    keep = (before < p) & (vals > NEG_INF)
    threshold = vals.masked_fill(~keep, float("inf")).amin(dim=-1, keepdim=True)
    threshold.masked_fill_(~view.top_p_in_top_k[:, None], NEG_INF)  # other rows: untouched
    x.masked_fill_(x < threshold, NEG_INF)


def _top_p_sorted(x: torch.Tensor, view: BatchView) -> None:
    """top-p by a full sort, for the rows without a (small) top-k (view.top_p_sort_rows)."""
    rows = view.top_p_sort_rows
    sub = x if view.top_p_sort_all else x[rows]
    sorted_x, order = sub.sort(dim=-1)  # ascending
    cum = sorted_x.softmax(dim=-1).cumsum_(dim=-1)
    drop = cum <= (1.0 - view.fparams[rows, F_TOP_P, None])
    drop[:, -1] = False  # always keep the most likely token
    sub.masked_fill_(drop.scatter(1, order, drop), NEG_INF)
    if not view.top_p_sort_all:
        x[rows] = sub


def draw(x: torch.Tensor, view: BatchView, steps: torch.Tensor, use_triton: bool,
         chunk_elems: int, vhash: torch.Tensor | None) -> torch.Tensor:
    """[rows] int64: argmax for greedy rows, Gumbel-max with (seed, step, v) noise for the others."""
    if use_triton:
        return gumbel_argmax(x, view.seeds, steps, view.greedy)
    return gumbel_argmax_reference(x, view.seeds, steps, view.greedy, vhash, chunk_elems)
