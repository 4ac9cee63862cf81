"""The accuracy cost of --kv-cache-dtype fp8, through the engine's ModelRunner on the CPU (torch backend):
prompt logprobs against the bf16 cache on a random Llama-shape model, and greedy agreement against the
fp32 cache on the real stories260k (fp32 weights). The numbers are printed (pytest -s) for the notes."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "engine"))
from model_driver import generate, greedy_examples, prefill_logits  # noqa: E402

from engine_svc.config import EngineConfig  # noqa: E402
from engine_svc.model_runner import ModelRunner  # noqa: E402

# Llama-3's proportions at a CPU-test size: GQA 4:1, head_dim 64, RMSNorm, rope 500000, SwiGLU
LLAMA_SHAPE = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 512, "intermediate_size": 1792,
    "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
    "vocab_size": 4096, "max_position_embeddings": 2048, "hidden_act": "silu", "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}


def _runner(model, dtype="float32", **kw):
    runner = ModelRunner(EngineConfig(model=str(model), device="cpu", dtype=dtype, num_gpu_blocks_override=128, **kw))
    runner.load_model()
    runner.allocate_kv_cache(runner.determine_num_blocks())
    runner.warmup()
    return runner


def _teacher_forced_agreement(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return torch.cat([(x.argmax(-1) == y.argmax(-1)).float() for x, y in zip(a, b)]).mean().item()


def test_fp8_cache_logprobs_against_bf16_cache(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_SHAPE))
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 4096, (n,), generator=gen).tolist() for n in (300, 77, 513)]
    outs = {}
    for kv in ("auto", "fp8"):
        runner = _runner(tmp_path, load_format="dummy", dtype="bfloat16", kv_cache_dtype=kv)
        assert runner.kv_caches[0][0].dtype == (torch.bfloat16 if kv == "auto" else torch.float8_e4m3fn)
        outs[kv] = [lg.float().log_softmax(-1) for lg in prefill_logits(runner, prompts)]
    ref, got = torch.cat(outs["auto"]), torch.cat(outs["fp8"])
    top = ref.argmax(-1)
    d_top = (got.gather(1, top[:, None]) - ref.gather(1, top[:, None])).abs()  # at the bf16 cache's top token
    p = ref.exp()
    d_mean = ((got - ref).abs() * p).sum(-1)  # |delta logprob|, weighted by the bf16 cache's probabilities
    agree = (got.argmax(-1) == top).float().mean().item()
    print(f"\nfp8 vs bf16 cache, random Llama shape, {ref.shape[0]} positions: |dlogprob| at top-1 mean "
          f"{d_top.mean():.4f} max {d_top.max():.4f}; prob-weighted mean {d_mean.mean():.4f}; top-1 agreement "
          f"{agree:.3f}")
    assert d_top.mean() < 0.05 and d_top.max() < 0.5
    assert agree > 0.9


def test_fp8_cache_greedy_on_stories260k(stories260k_dir):
    examples = greedy_examples(stories260k_dir)
    prompts = [e["prompt_ids"] for e in examples]
    max_new = 32  # the greedy prefix diverges within tens of tokens (below); more only costs CI time
    outs = {kv: generate(_runner(stories260k_dir, kv_cache_dtype=kv), prompts, max_new=max_new)
            for kv in ("auto", "fp8")}
    for e, out in zip(examples, outs["auto"]):
        assert out == e["expected_ids"][:max_new]  # the fp32 cache reproduces the recorded ids
    same = sum(a == b for x, y in zip(outs["auto"], outs["fp8"]) for a, b in zip(x, y))
    total = sum(len(x) for x in outs["auto"])
    prefix = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
              for x, y in zip(outs["auto"], outs["fp8"])]
    # teacher-forced: the next-token argmax over the recorded greedy texts, fp8 vs fp32 cache
    texts = [e["prompt_ids"] + e["expected_ids"] for e in examples]
    logits = {kv: prefill_logits(_runner(stories260k_dir, kv_cache_dtype=kv), texts) for kv in ("auto", "fp8")}
    forced = _teacher_forced_agreement(logits["auto"], logits["fp8"])
    print(f"\nstories260k greedy, fp8 vs fp32 cache: identical greedy prefix per prompt {prefix} of {max_new} "
          f"tokens ({same}/{total} equal position by position); teacher-forced next-token agreement "
          f"{forced:.3f} over {sum(len(t) for t in texts)} positions")
    assert min(prefix) >= 3 and forced > 0.9
