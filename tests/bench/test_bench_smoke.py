"""Every benchmark of bench/ runs in its smallest mode on the CPU (stories260k), so that none of them
rots before it reaches the GPU; and the shared workload is the one the issue specifies."""

from __future__ import annotations

import gc
import json
import shutil

import pytest

from bench import baseline_hf, harness, latency, serving, startup, throughput

# A tiny engine: few sequences, a small token budget and KV cache (fast profiling and warm-up).
ENGINE = ["--max-num-seqs", "4", "--max-num-batched-tokens", "128", "--kv-cache-memory", str(8 << 20)]
SHORT_MIX = ["--input-mean", "12", "--output-mean", "6"]


@pytest.fixture(autouse=True)
def _no_out(monkeypatch):
    monkeypatch.delenv("OUT", raising=False)  # results go to --out only


@pytest.fixture
def config_only_model(tmp_path, stories260k_dir):
    """A config-only directory, as bench/configs/llama3-8b is: for --load-format dummy (random
    weights; serving.py adds a word-level tokenizer), the way the GPU runs go."""
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(stories260k_dir / "config.json", model / "config.json")
    return model


def written(path) -> dict:
    return json.loads(path.read_text())


def check_provenance(report: dict, name: str) -> None:
    assert report["benchmark"].startswith(name)
    assert report["device"].startswith("cpu: ")
    assert report["date"] and report["git_commit"]


def test_sharegpt_mix_matches_the_issue():
    work = harness.sharegpt_mix(1000, vocab_size=128256, max_model_len=4096)
    assert work == harness.sharegpt_mix(1000, vocab_size=128256, max_model_len=4096)  # fixed seed
    prompts, outputs = [len(p) for p, _ in work], [n for _, n in work]
    # Log-normal with sigma 1: the sample means of 1000 draws land within ~10% of 215 / 197.
    assert 190 < sum(prompts) / 1000 < 240 and 175 < sum(outputs) / 1000 < 220
    assert all(p + n <= 4096 for p, n in zip(prompts, outputs)) and min(prompts) >= 1 and min(outputs) >= 1
    short = harness.sharegpt_mix(200, vocab_size=512, max_model_len=64)
    assert all(p + n <= 64 and n <= 32 for p, n in ((len(p), n) for p, n in short))
    assert all(3 <= t < 512 for p, _ in short for t in p)


def test_union_length_counts_overlap_once():
    assert throughput.union_length([(0, 10), (5, 15), (20, 25), (21, 22)]) == 20
    assert throughput.union_length([]) == 0


def test_throughput_smoke(tmp_path, capsys):
    out = tmp_path / "throughput.json"
    report = throughput.main([*ENGINE, *SHORT_MIX, "--num-requests", "6", "--warmup-requests", "1",
                              "--out", str(out)])
    assert written(out) == report
    check_provenance(report, "throughput")
    assert set(report["results"]) == {"temperature_1", "temperature_0"}
    for r in report["results"].values():
        assert r["requests_per_s"] > 0 and r["total_tokens_per_s"] > r["output_tokens_per_s"] > 0
        assert r["gpu_busy_fraction"] is None  # no device profiler on the CPU
    assert report["workload"]["num_requests"] == 6
    assert "total tok/s" in capsys.readouterr().out
    assert gc.get_freeze_count() > 0  # timed as served: the startup heap frozen (kvmesh/serving/heap.py)


def test_latency_smoke(tmp_path, capsys):
    out = tmp_path / "latency.json"
    report = latency.main([*ENGINE, "--batch-sizes", "1,2", "--prompt-len", "8", "--decode-steps", "3",
                           "--steady-batch", "2", "--steady-context", "24", "--copy-mib", "8", "--out", str(out)])
    assert written(out) == report
    check_provenance(report, "latency")
    assert report["copy_bandwidth_gb_s"] > 0 and report["weight_bytes"] > 0
    assert [r["batch"] for r in report["results"]["batch"]] == [1, 2]
    steady = report["results"]["steady"]
    assert steady["floor_ms"] > report["results"]["batch"][0]["floor_ms"]  # KV bytes on top of the weights
    assert 20 <= steady["mean_context"] <= 28
    assert "x floor" in capsys.readouterr().out


def test_baseline_hf_smoke_with_dummy_weights(tmp_path, config_only_model, capsys):
    out = tmp_path / "baseline.json"
    report = baseline_hf.main([*ENGINE, "--model", str(config_only_model), "--load-format", "dummy", "--num-requests", "4", "--input-mean", "8", "--output-mean", "6",
                               "--hf-batch-size", "2", "--out", str(out)])
    assert written(out) == report
    check_provenance(report, "baseline_hf")
    hf, ours = report["results"]["hf_static"], report["results"]["continuous"]
    assert hf["useful_tokens"] == ours["useful_tokens"] == report["workload"]["output_tokens"]
    assert hf["generated_tokens"] >= hf["useful_tokens"]  # padding to the batch's longest output
    assert report["ratio_continuous_over_hf_static"] > 0
    assert "continuous / this" in capsys.readouterr().out


@pytest.mark.slow
def test_serving_smoke_with_a_config_only_model(tmp_path, config_only_model, capsys):
    out = tmp_path / "serving.json"
    report = serving.main([*ENGINE, "--model", str(config_only_model), "--load-format", "dummy", "--rates", "20",
                           "--num-requests", "3", *SHORT_MIX, "--out", str(out)])
    assert written(out) == report
    check_provenance(report, "serving")
    assert report["config"]["tokenizer"].startswith("word-level")
    for path in ("engine", "router"):
        r = report["results"]["rate_20"][path]
        assert r["errors"] == {} and r["completed"] == 3, r
        assert r["ttft_p50_ms"] > 0 and r["itl_p50_ms"] is not None
    assert "TTFT p99" in capsys.readouterr().out


@pytest.mark.slow
def test_startup_smoke(tmp_path, capsys):
    out = tmp_path / "startup.json"
    report = startup.main([*ENGINE, "--out", str(out)])
    assert written(out) == report
    check_provenance(report, "startup")
    for run in ("cold", "warm"):
        r = report["results"][run]
        assert set(startup.PHASES) <= set(r["phase_seconds"]), r
        assert r["to_serving_s"] > r["to_listening_s"] > 0
    assert "to SERVING s" in capsys.readouterr().out
