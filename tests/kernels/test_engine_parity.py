"""The engine's output with our Triton kernels equals its output with the plain-PyTorch reference path.

Both runners drive the same ModelRunner (engine_svc/model_runner.py) on CUDA through the test-side
scheduler of tests/engine/model_driver.py, with chunked prefills mixed into other requests' decodes;
one uses the Triton attention backend and fused layer kernels (decode in CUDA graphs), the other the
torch backend and torch layer ops (eager).
"""

from __future__ import annotations

import json
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "engine"))
from model_driver import generate, greedy_examples  # noqa: E402

from engine_svc.config import EngineConfig  # noqa: E402
from engine_svc.model_runner import ModelRunner  # noqa: E402
from engine_svc.sampling_params import SamplingParams  # noqa: E402

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(temperature=0.0, logprobs=True, top_logprobs=5)


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def run(model, impl: str, prompts, max_new, **cfg):
    runner = ModelRunner(EngineConfig(model=str(model), device="cuda", gpu_memory_utilization=0.25,
                                      max_num_seqs=16, **cfg), attention_backend=impl, layer_ops=impl)
    runner.load_model()
    runner.allocate_kv_cache(runner.determine_num_blocks())
    runner.warmup()
    assert runner.backend.name == impl
    outs = generate(runner, prompts, max_new=max_new, params=GREEDY, chunk=7, stagger=True)
    records = [r.records for r in generate.last_reqs]
    del runner
    torch.cuda.empty_cache()
    return outs, records


def test_stories260k_fp32_greedy_identical(stories260k_dir):
    ex = greedy_examples(stories260k_dir)
    prompts = [e["prompt_ids"] for e in ex]
    n = ex[0]["max_new_tokens"]
    tri, tri_rec = run(stories260k_dir, "triton", prompts, n, dtype="float32")
    ref, ref_rec = run(stories260k_dir, "torch", prompts, n, dtype="float32")
    assert tri == ref
    assert tri == [e["expected_ids"][:n] for e in ex]
    for a, b in zip(tri_rec, ref_rec):
        diff = max(abs(x.logprob - y.logprob) for x, y in zip(a, b))
        assert diff < 1e-4, f"fp32 logprobs differ by {diff:.2e}"


def check_logprobs_close(outs_a, recs_a, outs_b, recs_b, tol):
    """Greedy outputs agree token by token with logprobs within tol, until a near-tie: at the first
    differing token, each side's choice must be among the other's top candidates (then stop)."""
    diverged = 0
    for i, (oa, ra, ob, rb) in enumerate(zip(outs_a, recs_a, outs_b, recs_b)):
        for t, (x, y) in enumerate(zip(ra, rb)):
            if oa[t] == ob[t]:
                assert abs(x.logprob - y.logprob) < tol, f"seq {i} token {t}: {x.logprob} vs {y.logprob}"
                continue
            assert oa[t] in [c for c, _ in y.top_logprobs], f"seq {i} token {t}: {oa[t]} not in ref top-5"
            assert ob[t] in [c for c, _ in x.top_logprobs], f"seq {i} token {t}: {ob[t]} not in top-5"
            diverged += 1
            break
    return diverged


def test_random_llama_bf16_logprobs_close(tmp_path):
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
           "intermediate_size": 5632, "num_hidden_layers": 4, "num_attention_heads": 16,
           "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 32000, "max_position_embeddings": 4096,
           "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "eos_token_id": 2,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 32000, (n,), generator=gen).tolist() for n in (5, 60, 333, 1100)]
    kw = dict(dtype="bfloat16", load_format="dummy", seed=0)
    tri, tri_rec = run(tmp_path, "triton", prompts, 24, **kw)
    ref, ref_rec = run(tmp_path, "torch", prompts, 24, **kw)
    diverged = check_logprobs_close(tri, tri_rec, ref, ref_rec, tol=0.1)
    assert diverged <= len(prompts) // 2, f"{diverged} of {len(prompts)} sequences diverged"
