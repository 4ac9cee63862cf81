"""bench/step_floor.py: the recorded schedule covers every token once, and a step's floor is the
larger of its compute and memory times (a batch-1 decode step: the weight stream)."""

from __future__ import annotations

import pathlib

from bench.harness import GPU_ENGINE, model_config, sharegpt_mix
from bench.step_floor import kind, schedule, shape_costs, step_floor

CONFIG_8B = pathlib.Path(__file__).resolve().parents[2] / "bench/configs/llama3-8b"


def test_schedule_computes_each_prompt_token_and_each_fed_back_output_once():
    vocab = model_config(str(CONFIG_8B))["vocab_size"]
    work = sharegpt_mix(40, vocab, GPU_ENGINE["max_model_len"])
    steps = schedule(40, vocab, prefix=False)
    computed = sum(n for rows in steps for _, n, _ in rows)
    # every prompt token, and every output token but the last (it is sampled, never fed back)
    assert computed == sum(len(p) + out - 1 for p, out in work)
    assert sum(s for rows in steps for _, _, s in rows) == sum(out for _, out in work)  # one sample per token
    assert {kind(rows) for rows in steps} >= {"mixed", "decode B 1-7"}


def test_a_batch_one_decode_step_is_bound_by_the_weight_stream():
    costs = shape_costs(model_config(str(CONFIG_8B)))
    assert round(costs["weight_bytes"] / 1e9, 2) == 15.01  # 8B body + lm_head, bf16 (no embedding table)
    s = step_floor([(1000, 1, True)], costs, peak_flops=790e12, bw=4280e9)
    assert s["floor"] == s["memory"] > s["compute"]
    assert abs(s["memory"] - (costs["weight_bytes"] + 1002 * costs["kv_bytes_per_token"]) / 4280e9) < 1e-12
    # a long prefill chunk is compute-bound, and the sequential bound is never below the overlapped one
    big = step_floor([(0, 4096, True)], costs, peak_flops=790e12, bw=4280e9)
    assert big["floor"] == big["compute"] > big["memory"] and big["sequential"] >= big["floor"]
