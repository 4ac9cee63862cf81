"""Compile kernels for Hopper (sm_90) on the CPU, without a GPU: the compiler rejects what Triton's
interpreter accepts (a module-level constant annotated `x: tl.constexpr = 1` instead of
`x = tl.constexpr(1)` ran in every CPU test and failed to compile on the H200). The JIT's
specialisation is reproduced by hand: pointer and scalar types per argument, constexprs given. The
compile runs in a child process without TRITON_INTERPRET (the session's kernels are interpreted).
"""

from __future__ import annotations

import inspect
import os
import pathlib
import subprocess
import sys

import pytest

# Not tests.conftest's REPO: importing conftest in the child would turn the interpreter on again.
REPO = pathlib.Path(__file__).resolve().parents[2]


def _signature(kernel, pointer_types: dict[str, str], constexprs: dict) -> dict[str, str]:
    sig = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointer_types[name]
        else:
            sig[name] = pointer_types.get(name, "i32")  # other scalars are named with their type
    return sig


def _cases() -> dict:
    from kernels import kv_cache, paged_attention_kernels, prefill_attention, sampling, sampling_penalties

    kv_heads = {"NUM_KV_HEADS": 8, "HEAD_DIM": 128, "HEADS_PAD": 8, "HEAD_DIM_PAD": 128, "BLOCK_SIZE": 16}
    kv_ptrs = {"key_ptr": "*bf16", "value_ptr": "*bf16", "slot_mapping_ptr": "*i64", "k_inv_scale_ptr": "*fp32",
               "v_inv_scale_ptr": "*fp32"}
    attn_ptrs = {"out_ptr": "*bf16", "part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32", "query_ptr": "*bf16",
                 "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16", "block_tables_ptr": "*i32",
                 "query_start_loc_ptr": "*i32", "seq_lens_ptr": "*i32", "seq_index_ptr": "*i32",
                 "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32", "scale_log2": "fp32"}
    attn = {"QPK": 4, "HEAD_DIM": 128, "HEAD_DIM_PAD": 128, "BLOCK_SIZE": 16, "USE_WINDOW": False, "SPLIT": False,
            "IEEE_DOT": False, "KV_FP8": False, "FP8_VIA_F16": False, "STRIDED": False}
    kernel = paged_attention_kernels._paged_attention_kernel
    prefill_ptrs = {**attn_ptrs, **{f"{x}_desc": "tensordesc<bf16[64, 128]>" for x in "qkvo"}}
    prefill = {"NUM_HEADS": 32, "QPK": 4, "HEAD_DIM": 128, "BLOCK_SIZE": 16, "BLOCK_M": 64, "BLOCK_N": 64,
               "SKIP_SINGLE": True, "IEEE_DOT": False,
               **prefill_attention.SHORT_CHUNK_VARIANT}
    return {
        # a mixed step: prefill tiles that leave the one-token sequences to the indexed decode launch
        "attention_mixed": (kernel, attn_ptrs, {**attn, "BLOCK_M": 128, "BLOCK_Q": 32, "TILE_N": 128, "DECODE": False,
                                                "K_ROWS": True, "SEQ_INDEX": False, "SKIP_SINGLE": True}),
        "attention_decode_listed": (kernel, attn_ptrs, {**attn, "BLOCK_M": 16, "BLOCK_Q": 4, "TILE_N": 128,
                                                        "DECODE": True, "K_ROWS": False, "SEQ_INDEX": True,
                                                        "SKIP_SINGLE": False, "STRIDED": True}),
        # a small decode batch split over KV, each split taking every n-th tile
        "attention_decode_split": (kernel, attn_ptrs, {**attn, "BLOCK_M": 16, "BLOCK_Q": 4, "TILE_N": 128,
                                                       "DECODE": True, "K_ROWS": False, "SEQ_INDEX": False,
                                                       "SKIP_SINGLE": False, "SPLIT": True, "STRIDED": True}),
        # a bf16 query over an e4m3 cache, its tiles converted to f16
        "attention_decode_fp8": (kernel, {**attn_ptrs, "k_cache_ptr": "*fp8e4nv", "v_cache_ptr": "*fp8e4nv"},
                                 {**attn, "BLOCK_M": 16, "BLOCK_Q": 4, "TILE_N": 128, "DECODE": True, "K_ROWS": False,
                                  "SEQ_INDEX": False, "SKIP_SINGLE": False, "KV_FP8": True, "FP8_VIA_F16": True,
                                  "STRIDED": True}),
        # prefill chunks reading their own K/V through TMA descriptors (64-row tiles: the mixed graphs')
        "prefill_contiguous": (prefill_attention._prefill_attention_kernel, prefill_ptrs, prefill),
        "gumbel_argmax": (sampling._gumbel_argmax_kernel,
                          {"best_val_ptr": "*fp32", "best_idx_ptr": "*i64", "logits_ptr": "*fp32",
                           "seeds_ptr": "*i64", "steps_ptr": "*i64", "greedy_ptr": "*i64"},
                          {"BLOCK": sampling.BLOCK, "SPLIT": sampling.SPLIT}),
        "uniform_noise": (sampling._uniform_noise_kernel,
                          {"out_ptr": "*fp32", "seeds_ptr": "*i64", "steps_ptr": "*i64"}, {"BLOCK": sampling.BLOCK}),
        "penalties": (sampling_penalties._apply_penalties_kernel,
                      {"logits_ptr": "*fp32", "table_row_ptr": "*i64", "params_ptr": "*fp32", "mask_ptr": "*u8",
                       "counts_ptr": "*i32"}, {"BLOCK": 1024}),
        "write_kv_fp8": (kv_cache._write_kv_cache_kernel,
                         {**kv_ptrs, "k_cache_ptr": "*fp8e4nv", "v_cache_ptr": "*fp8e4nv"},
                         {**kv_heads, "CACHE_FP8": True}),
        "write_kv_bf16": (kv_cache._write_kv_cache_kernel, {**kv_ptrs, "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16"},
                          {**kv_heads, "CACHE_FP8": False}),
    }


def _compile_all() -> None:
    """Child process: compile every case for sm_90; print one line each."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for name, (kernel, pointers, constexprs) in sorted(_cases().items()):
        compiled = triton.compile(ASTSource(kernel, _signature(kernel, pointers, constexprs), constexprs),
                                  target=GPUTarget("cuda", 90, 32))
        assert ".target sm_90" in compiled.asm["ptx"], name
        print("compiled", name, flush=True)


def test_kernels_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia.compiler", reason="this Triton has no CUDA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "tests.kernels.test_compile_sm90"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("compiled")) == \
        sorted(_case_names())


def _case_names() -> list[str]:
    return ["attention_decode_fp8", "attention_decode_listed", "attention_decode_split", "attention_mixed", "gumbel_argmax", "penalties", "prefill_contiguous",
            "uniform_noise", "write_kv_bf16", "write_kv_fp8"]


if __name__ == "__main__":
    _compile_all()
