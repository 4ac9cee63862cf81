"""The model runner on CUDA (run with `pytest -m gpu` on the GPU machine): Triton backend, fused
layer kernels, CUDA-graph decode, KV sizing from gpu_memory_utilization, half precision."""

from __future__ import annotations

import pytest
import torch
from model_driver import generate, greedy_examples, prefill_logits

from engine_svc.config import ConfigError, EngineConfig
from engine_svc.model_runner import ModelRunner
from engine_svc.sampling_params import SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def cuda_runner(model, **kw) -> ModelRunner:
    kw.setdefault("dtype", "float32")
    runner = ModelRunner(EngineConfig(model=str(model), device="cuda", **kw))
    runner.load_model()
    runner.allocate_kv_cache(runner.determine_num_blocks())
    runner.warmup()
    return runner


def test_graphs_captured_and_greedy_examples_reproduced(stories260k_dir):
    runner = cuda_runner(stories260k_dir, max_num_seqs=64, gpu_memory_utilization=0.3)
    assert runner.backend.name == "triton" and runner.graphs and runner.graphs.sizes[-1] == 64
    assert max(runner.mixed_graphs) == 2048  # prefill steps replay mixed graphs
    ex = greedy_examples(stories260k_dir)
    outs = generate(runner, [e["prompt_ids"] for e in ex], max_new=128)
    for e, out in zip(ex, outs):
        same = next((i for i, (a, b) in enumerate(zip(out, e["expected_ids"])) if a != b), len(out))
        assert out == e["expected_ids"], f"{e['prompt']!r}: first difference at token {same}"


def test_graph_and_eager_decode_agree_with_batch_padding(stories260k_dir):
    ex = greedy_examples(stories260k_dir)
    prompts = [e["prompt_ids"] for e in ex] * 3  # 9 sequences: padded to the 16-graph
    graphed = cuda_runner(stories260k_dir, max_num_seqs=32, gpu_memory_utilization=0.3)
    eager = cuda_runner(stories260k_dir, max_num_seqs=32, gpu_memory_utilization=0.3, enforce_eager=True)
    assert graphed.graphs and graphed.mixed_graphs and not eager.graphs and not eager.mixed_graphs
    params = [SamplingParams(temperature=0.8, seed=i) for i in range(len(prompts))]
    assert generate(graphed, prompts, max_new=64, params=params, stagger=True) == \
        generate(eager, prompts, max_new=64, params=params, stagger=True)


def test_decode_graphs_by_context_length_agree_with_eager(stories260k_dir):
    """Decode batches replay the graph planned for their longest sequence (kernels/paged_attention.py's
    decode_graph_lengths: here 128 / 256 / 512 positions for 4 sequences over 4 KV heads). Contexts
    that cross 256 and reach the limit give the tokens the eager steps give."""
    graphed = cuda_runner(stories260k_dir, max_num_seqs=8, gpu_memory_utilization=0.3)
    eager = cuda_runner(stories260k_dir, max_num_seqs=8, gpu_memory_utilization=0.3, enforce_eager=True)
    assert len(graphed.graphs) > len(graphed.graphs.sizes)  # some batch size has graphs of two lengths
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (200, 240, 449)]
    assert generate(graphed, prompts, max_new=64) == generate(eager, prompts, max_new=64)


def test_prefill_logits_match_hf_on_cuda(stories260k_dir):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(stories260k_dir, dtype=torch.float32).cuda().eval()
    runner = cuda_runner(stories260k_dir, gpu_memory_utilization=0.3, enforce_eager=True)
    prompt = greedy_examples(stories260k_dir)[0]["prompt_ids"]
    with torch.no_grad():
        ref = hf(torch.tensor([prompt], device="cuda")).logits[0]
    torch.testing.assert_close(prefill_logits(runner, [prompt])[0], ref, atol=1e-3, rtol=0)


def test_kv_sizing_from_gpu_memory_utilization(stories260k_dir):
    runner = ModelRunner(EngineConfig(model=str(stories260k_dir), device="cuda", gpu_memory_utilization=0.2))
    runner.load_model()
    num_blocks = runner.determine_num_blocks()
    total = torch.cuda.mem_get_info()[1]
    assert 0.15 * total < num_blocks * runner.kv_bytes_per_block() < 0.2 * total
    runner.allocate_kv_cache(num_blocks)
    assert torch.cuda.memory_allocated() < 0.2 * total


def test_second_engine_sizes_from_its_own_share(stories260k_dir):
    """KV sizing is per engine instance: an engine alive in the process does not eat the next one's
    share, and a share larger than what is free is refused with the numbers."""
    def sized(util):
        runner = ModelRunner(EngineConfig(model=str(stories260k_dir), device="cuda", gpu_memory_utilization=util))
        runner.load_model()
        return runner, runner.determine_num_blocks()

    first, n1 = sized(0.2)
    first.allocate_kv_cache(n1)
    second, n2 = sized(0.2)
    assert abs(n2 - n1) <= 0.02 * n1, (n1, n2)
    second.allocate_kv_cache(n2)
    with pytest.raises(ConfigError, match=r"gpu_memory_utilization=0.7 asks for .* GiB.*only .* GiB .* free"):
        sized(0.7)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_dummy_llama3_shape(tmp_path, dtype):
    import json
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 1024,
           "intermediate_size": 2816, "num_hidden_layers": 4, "num_attention_heads": 16,
           "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 32000, "max_position_embeddings": 4096,
           "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "eos_token_id": 2,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    runner = cuda_runner(tmp_path, dtype=dtype, load_format="dummy", gpu_memory_utilization=0.3, max_num_seqs=16)
    prompts = [list(range(3, 3 + n)) for n in (5, 300, 1200)]
    outs = generate(runner, prompts, max_new=32, chunk=512)
    assert all(len(o) == 32 for o in outs)
    logits = prefill_logits(runner, prompts[:1])[0]
    assert torch.isfinite(logits).all()
