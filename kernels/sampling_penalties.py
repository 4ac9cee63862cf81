"""Repetition, frequency and presence penalties in one in-place pass over the logits.

Each row names its row of two persistent tables (or -1: no penalties): ``prompt_mask`` (the prompt's
tokens, for the repetition penalty) and ``output_counts`` (how often each token was generated). Per
token, in transformers' / OpenAI's order:

    seen = prompt_mask | count > 0
    x = where(seen, where(x < 0, x * repetition, x / repetition), x)      (HF: prompt + output)
    x = x - (frequency * count + presence * (count > 0))                  (OpenAI: output only)

Imports torch and triton only, never the engine.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._checks import check_tensor

BLOCK = 2048  # columns per program


@triton.jit
def _apply_penalties_kernel(
    logits_ptr,  # [num_rows, V] fp32, updated in place, row stride free
    table_row_ptr,  # [num_rows] int64: the row of prompt_mask / output_counts, -1 = no penalties
    params_ptr,  # [num_rows, >= 3] fp32: repetition, presence, frequency (row stride free)
    mask_ptr,  # [num_table_rows, V] uint8 (the bool table's bytes)
    counts_ptr,  # [num_table_rows, V] int32
    stride_l, stride_p, stride_m, stride_c, V,
    BLOCK: tl.constexpr,  # columns per program
):
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(table_row_ptr + row)
    if t >= 0:
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < V
        rep = tl.load(params_ptr + row * stride_p)
        presence = tl.load(params_ptr + row * stride_p + 1)
        frequency = tl.load(params_ptr + row * stride_p + 2)
        x = tl.load(logits_ptr + row * stride_l + cols, mask=ok, other=0.0)
        in_prompt = tl.load(mask_ptr + t * stride_m + cols, mask=ok, other=0) != 0
        count = tl.load(counts_ptr + t * stride_c + cols, mask=ok, other=0).to(tl.float32)
        x = tl.where(in_prompt | (count > 0), tl.where(x < 0, x * rep, x / rep), x)
        x = x - (frequency * count + presence * (count > 0).to(tl.float32))
        tl.store(logits_ptr + row * stride_l + cols, x, mask=ok)


def _check(logits, table_rows, params, prompt_mask, output_counts) -> None:
    check_tensor("logits", logits, ndim=2, dtypes=(torch.float32,))
    check_tensor("table_rows", table_rows, ndim=1, dtypes=(torch.int64,), contiguous=True, device=logits.device)
    check_tensor("params", params, ndim=2, dtypes=(torch.float32,), device=logits.device)
    check_tensor("prompt_mask", prompt_mask, ndim=2, dtypes=(torch.bool,), device=logits.device)
    check_tensor("output_counts", output_counts, ndim=2, dtypes=(torch.int32,), device=logits.device)
    n, V = logits.shape
    if table_rows.shape[0] != n or params.shape[0] != n or params.shape[1] < 3:
        raise ValueError(f"table_rows {tuple(table_rows.shape)} / params {tuple(params.shape)}: expected "
                         f"[{n}] and [{n}, >=3] for logits {tuple(logits.shape)}")
    if prompt_mask.shape != output_counts.shape or prompt_mask.shape[1] != V:
        raise ValueError(f"prompt_mask {tuple(prompt_mask.shape)} and output_counts "
                         f"{tuple(output_counts.shape)} must both be [*, {V}]")


def apply_penalties(logits: torch.Tensor, table_rows: torch.Tensor, params: torch.Tensor,
                    prompt_mask: torch.Tensor, output_counts: torch.Tensor) -> None:
    """Apply the penalties to ``logits`` in place (see the module docstring).

    Args:
        logits: ``[n, V]`` fp32, row stride free.
        table_rows: ``[n]`` int64, each row's row of the tables, -1 for rows without penalties.
        params: ``[n, >=3]`` fp32: repetition, presence, frequency penalty per row (column stride 1).
        prompt_mask: ``[R, V]`` bool; output_counts: ``[R, V]`` int32 (both column stride 1).

    Grid: (n, ceil(V / BLOCK)); programs of rows without penalties return at once.
    """
    _check(logits, table_rows, params, prompt_mask, output_counts)
    n, V = logits.shape
    if n == 0:
        return
    _apply_penalties_kernel[(n, triton.cdiv(V, BLOCK))](
        logits, table_rows, params, prompt_mask.view(torch.uint8), output_counts,
        logits.stride(0), params.stride(0), prompt_mask.stride(0), output_counts.stride(0), V,
        BLOCK=BLOCK, num_warps=4)


def apply_penalties_reference(logits: torch.Tensor, table_rows: torch.Tensor, params: torch.Tensor,
                              prompt_mask: torch.Tensor, output_counts: torch.Tensor) -> None:
    """apply_penalties in PyTorch (the CPU path): only the rows with a table row are touched."""
    _check(logits, table_rows, params, prompt_mask, output_counts)
    rows = torch.nonzero(table_rows >= 0).flatten()
    if rows.numel() == 0:
        return
    t = table_rows[rows]
    x = logits[rows]
    count = output_counts[t].float()
    rep, presence, frequency = (params[rows, i, None] for i in range(3))
    seen = prompt_mask[t] | (count > 0)
    x = torch.where(seen, torch.where(x < 0, x * rep, x / rep), x)
    x = x - (frequency * count + presence * (count > 0).float())
    logits[rows] = x
