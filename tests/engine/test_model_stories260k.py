"""The real stories260k checkpoint through our ModelRunner, against its recorded greedy ids and HF."""

from __future__ import annotations

import pytest
import torch
from model_driver import generate, greedy_examples, make_runner, one_thread, prefill_logits

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(scope="module")
def examples(stories260k_dir):
    return greedy_examples(stories260k_dir)


@pytest.fixture(scope="module")
def hf_model(stories260k_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(stories260k_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_greedy_examples_reproduced_batched(stories260k_dir, examples, block_size):
    runner = make_runner(stories260k_dir, block_size=block_size)
    outs = generate(runner, [e["prompt_ids"] for e in examples], max_new=examples[0]["max_new_tokens"])
    for e, out in zip(examples, outs):
        assert out == e["expected_ids"], e["prompt"]


def test_greedy_examples_chunked_and_staggered(stories260k_dir, examples):
    runner = make_runner(stories260k_dir, block_size=16)
    prompts = [e["prompt_ids"] for e in examples]
    outs = generate(runner, prompts, max_new=128, chunk=3, stagger=True)
    for e, out in zip(examples, outs):
        assert out == e["expected_ids"], e["prompt"]


def test_greedy_examples_one_at_a_time(stories260k_dir, examples):
    runner = make_runner(stories260k_dir, block_size=16)
    for e in examples:
        assert generate(runner, [e["prompt_ids"]], max_new=128)[0] == e["expected_ids"]


def test_prefill_logits_match_hf(stories260k_dir, examples, hf_model):
    runner = make_runner(stories260k_dir)
    prompts = [e["prompt_ids"] + e["expected_ids"][:40] for e in examples]
    for prompt, mine in zip(prompts, prefill_logits(runner, prompts)):
        with torch.no_grad():
            ref = hf_model(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(mine, ref, atol=1e-4, rtol=0)


def test_model_info_stop_ids_from_generation_config(stories260k_dir):
    runner = make_runner(stories260k_dir)
    info = runner.info
    assert info.eos_token_ids == [2, 1]  # config.json's 2, then generation_config.json's [2, 1]
    assert (info.vocab_size, info.model_max_len, info.bos_token_id) == (512, 512, 1)
    assert (info.num_layers, info.num_kv_heads, info.head_dim, info.dtype) == (5, 4, 8, "float32")
