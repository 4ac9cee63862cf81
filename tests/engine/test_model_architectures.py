"""Each supported architecture, as a tiny random HF checkpoint, against HF transformers itself.

Configs come from transformers' own config classes; weights are HF's random init plus noise on
every tensor (so biases and norm weights are not trivially 0 / 1); checkpoints are written with
save_pretrained as safetensors, one of them sharded.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from model_driver import generate, make_runner, one_thread, prefill_logits

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
              rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)

ARCHS = {
    "llama3": (transformers.LlamaConfig, dict(
        rope_theta=50000.0, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    # Llama 2 style with linear rope scaling, tied embeddings, and biases everywhere (attention_bias
    # puts one on o_proj too, unlike Qwen2).
    "llama_linear": (transformers.LlamaConfig, dict(
        tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "mistral": (transformers.MistralConfig, dict(sliding_window=8, tie_word_embeddings=False)),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=True, use_sliding_window=True,
                                             sliding_window=8, max_window_layers=1)),
    "qwen3": (transformers.Qwen3Config, dict(tie_word_embeddings=False, attention_bias=True)),
}
PROMPT_LENS = [5, 17, 33, 50]


def _hf_model(arch: str):
    cls, extra = ARCHS[arch]
    cfg = cls(**COMMON, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.15)
    return model


@pytest.fixture(scope="module", params=list(ARCHS))
def checkpoint(request, tmp_path_factory):
    arch = request.param
    model = _hf_model(arch)
    path = tmp_path_factory.mktemp(arch)
    # llama3 is saved sharded (model.safetensors.index.json); the others as one file.
    kwargs = {"max_shard_size": "100KB"} if arch == "llama3" else {}
    model.save_pretrained(path, **kwargs)
    if arch == "llama3":
        assert (path / "model.safetensors.index.json").exists()
    return arch, path, model


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(3, COMMON["vocab_size"], (n,), generator=gen).tolist() for n in PROMPT_LENS]


def _hf_greedy(model, prompt: list[int], max_new: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.shape[1] == len(prompt) + max_new
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def hf_greedy(checkpoint):
    _, _, model = checkpoint
    return [_hf_greedy(model, p, 64) for p in _prompts()]


def test_prefill_logits_match_hf(checkpoint):
    _, path, model = checkpoint
    runner = make_runner(path)
    prompts = _prompts()
    for prompt, mine in zip(prompts, prefill_logits(runner, prompts)):
        with torch.no_grad():
            ref = model(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(mine, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("block_size,chunk,stagger", [(16, None, False), (8, 7, True), (32, 20, False)])
def test_greedy_matches_hf_generate_batched(checkpoint, hf_greedy, block_size, chunk, stagger):
    _, path, _ = checkpoint
    runner = make_runner(path, block_size=block_size)
    assert generate(runner, _prompts(), max_new=64, chunk=chunk, stagger=stagger) == hf_greedy


def test_greedy_matches_hf_generate_single(checkpoint, hf_greedy):
    _, path, _ = checkpoint
    runner = make_runner(path)
    prompts = _prompts()
    for i in (0, 3):
        assert generate(runner, [prompts[i]], max_new=64) == [hf_greedy[i]]


def test_config_switches_read(checkpoint):
    arch, path, _ = checkpoint
    runner = make_runner(path)
    cfg = runner.model_cfg
    hf = json.loads((path / "config.json").read_text())
    expected_windows = {"mistral": [8] * 3, "qwen2": [None, 8, 8]}
    assert cfg.sliding_windows == expected_windows.get(arch, [None] * 3)
    assert cfg.qkv_bias == (arch in ("qwen2", "qwen3", "llama_linear")) and cfg.qk_norm == (arch == "qwen3")
    assert cfg.o_bias == (arch in ("qwen3", "llama_linear")) and cfg.mlp_bias == (arch == "llama_linear")
    assert cfg.tie_word_embeddings == hf.get("tie_word_embeddings", False) == (arch in ("qwen2", "llama_linear"))
    rope_types = {"llama3": "llama3", "llama_linear": "linear"}
    assert (cfg.rope_scaling or {}).get("rope_type", "default") == rope_types.get(arch, "default")


def test_old_and_new_rope_config_formats_agree():
    """transformers 4.x wrote rope_scaling + rope_theta (or "type"); 5.x writes rope_parameters."""
    from engine_svc.model.llama import LlamaConfig, rope_inv_freq
    base = dict(architectures=["LlamaForCausalLM"], model_type="llama", **COMMON)
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
    old = LlamaConfig.from_hf({**base, "rope_theta": 5e5, "rope_scaling": {**scaling, "rope_type": "llama3"}})
    new = LlamaConfig.from_hf({**base, "rope_parameters": {**scaling, "rope_type": "llama3", "rope_theta": 5e5}})
    assert old == new and old.rope_theta == 5e5
    hf = transformers.LlamaConfig(**COMMON, rope_scaling={**scaling, "rope_type": "llama3"}, rope_theta=5e5)
    assert LlamaConfig.from_hf(hf.to_dict()) == old
    legacy = LlamaConfig.from_hf({**base, "rope_scaling": {"type": "linear", "factor": 2.0}})
    plain = LlamaConfig.from_hf(base)
    torch.testing.assert_close(rope_inv_freq(legacy), rope_inv_freq(plain) / 2)
    assert not torch.equal(rope_inv_freq(old), rope_inv_freq(LlamaConfig.from_hf({**base, "rope_theta": 5e5})))
