"""The physical floor of the issue-10 mix: what no engine could beat on this GPU with this schedule.

    python bench/step_floor.py                                   # 8B shape, H200 ceilings
    python bench/step_floor.py --measured bench/results/step-profile-llama3-8b-h200-2026-12-01.json

With ignore_eos and every request queued at t=0, the scheduler's step sequence does not depend on
time, only on its own decisions; so the real EngineCore is stepped on the CPU with a runner that
returns at once (bench/core_step.py's FakeRunner), and each step's shape is recorded: per row the
context before the step and the tokens it computes. For every step the floor is

    max(FLOPs / peak matmul rate, bytes / copy bandwidth)

with FLOPs = 2 x (non-embedding weights) x tokens + 2 x lm_head x sampled rows + attention
(QK^T and PV: 4 x heads x head_dim per query token per visible position), and bytes = bf16 weights
+ KV read (every visible position of every row) + KV written. Activations, norms, the sampler and
kernel launch gaps are left out, so the floor is below what any engine reaches. Summed over the
steps it bounds the run's wall time, and 1000 / that sum bounds req/s.

--measured reads a step_profile.py JSON (device ms per kind of step over the same mix) and prints
measured / floor per kind: where the gap to the floor is.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.core_step import FakeRunner, _core  # noqa: E402
from bench.harness import GPU_ENGINE, model_config, print_table, save_report, sharegpt_mix  # noqa: E402
from engine_svc.core.request import Request  # noqa: E402
from engine_svc.sampling_params import SamplingParams  # noqa: E402

# step_profile.py's kinds of step: pure decode by batch size, and every step with a prefill chunk
DECODE_BINS = ((1, 7), (8, 31), (32, 127), (128, 255), (256, 10**9))


class RecordingRunner(FakeRunner):
    """FakeRunner that records each step's rows as (context before the step, new tokens, sampled)."""

    def __init__(self):
        super().__init__()
        self.steps: list[list[tuple[int, int, bool]]] = []

    def launch(self, plan):
        rows = {rid: row[0] for rid, row in self.rows.items()}
        for seq in plan.new_seqs:
            rows[seq.request_id] = seq.start_pos
        self.steps.append([(rows[rid], n, bool(s))
                           for rid, n, s in zip(plan.req_ids, plan.num_new_tokens, plan.sample)])
        return super().launch(plan)


def schedule(num_requests: int, vocab: int, prefix: bool) -> list[list[tuple[int, int, bool]]]:
    runner = RecordingRunner()
    core = _core(runner, num_blocks=32768, prefix=prefix, **GPU_ENGINE)
    for i, (prompt, n) in enumerate(sharegpt_mix(num_requests, vocab, GPU_ENGINE["max_model_len"])):
        core.add(Request(f"s-{i}", prompt, SamplingParams(temperature=1.0, max_tokens=n, ignore_eos=True)))
    while core.has_work:
        core.step()
    return runner.steps


def shape_costs(cfg: dict) -> dict:
    """Per-token FLOPs and bytes of a Llama-shape model in bf16."""
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or h // heads
    per_layer = h * heads * head_dim + 2 * h * kv_heads * head_dim + heads * head_dim * h + 3 * h * inter
    body, lm_head = layers * per_layer, h * cfg["vocab_size"]
    return {"body_params": body, "lm_head_params": lm_head, "weight_bytes": 2 * (body + lm_head),
            "kv_bytes_per_token": 2 * 2 * layers * kv_heads * head_dim,
            "attn_flops_per_pair": 4 * layers * heads * head_dim}


def step_floor(rows, costs, peak_flops: float, bw: float) -> dict[str, float]:
    """Seconds of one step: `floor` (every unit busy at once), `sequential` (the matmuls, then the
    attention, each at its own bound: what an engine of separate GEMM and attention kernels can
    reach), and the compute / memory parts."""
    tokens = sum(n for _, n, _ in rows)
    sampled = sum(1 for _, _, s in rows if s)
    # query j (0-based) of a row with context c sees c + j + 1 positions
    pairs = sum(n * c + n * (n + 1) // 2 for c, n, _ in rows)
    gemm_flops = 2 * costs["body_params"] * tokens + 2 * costs["lm_head_params"] * sampled
    attn_flops = costs["attn_flops_per_pair"] * pairs
    kv_bytes = (sum(c + n for c, n, _ in rows) + tokens) * costs["kv_bytes_per_token"]  # read + written
    compute = (gemm_flops + attn_flops) / peak_flops
    memory = (costs["weight_bytes"] + kv_bytes) / bw
    sequential = max(gemm_flops / peak_flops, costs["weight_bytes"] / bw) + max(attn_flops / peak_flops,
                                                                                  kv_bytes / bw)
    return {"floor": max(compute, memory), "sequential": sequential, "compute": compute, "memory": memory}


def kind(rows) -> str:
    if any(n > 1 for _, n, _ in rows):
        return "mixed"
    b = len(rows)
    lo, hi = next((lo, hi) for lo, hi in DECODE_BINS if lo <= b <= hi)
    return f"decode B>={lo}" if hi == 10**9 else f"decode B {lo}-{hi}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "bench/configs/llama3-8b"))
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--tflops", type=float, default=790.0, help="peak bf16 matmul rate (H200: ~790 measured)")
    p.add_argument("--bw-gbps", type=float, default=4280.0, help="copy bandwidth (H200: 4235-4280 measured)")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--measured", default=None, help="a step_profile.py JSON of the same mix")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    cfg = model_config(args.model)
    costs = shape_costs(cfg)
    steps = schedule(args.num_requests, cfg["vocab_size"], not args.no_prefix_caching)
    by_kind: dict[str, dict] = {}
    sums = dict.fromkeys(("floor", "sequential", "compute", "memory"), 0.0)
    for rows in steps:
        s = step_floor(rows, costs, args.tflops * 1e12, args.bw_gbps * 1e9)
        k = by_kind.setdefault(kind(rows), {"steps": 0, "floor_ms": 0.0, "sequential_ms": 0.0,
                                            "compute_bound_steps": 0})
        k["steps"] += 1
        k["floor_ms"] += s["floor"] * 1e3
        k["sequential_ms"] += s["sequential"] * 1e3
        k["compute_bound_steps"] += s["compute"] > s["memory"]
        for key in sums:
            sums[key] += s[key]
    total = sums["floor"]
    measured = {}
    if args.measured:
        measured = json.loads(pathlib.Path(args.measured).read_text())["mix"]
        for name, k in by_kind.items():
            m = measured["kinds"].get(name)
            if m:
                k["measured_ms"] = m["device_ms_total"]
                k["measured_steps"] = m["steps"]
                k["measured_over_floor"] = round(m["device_ms_total"] / k["floor_ms"], 3)
                k["measured_over_sequential"] = round(m["device_ms_total"] / k["sequential_ms"], 3)
    for k in by_kind.values():
        k["floor_ms"], k["sequential_ms"] = round(k["floor_ms"], 1), round(k["sequential_ms"], 1)
    report = {
        "note": "an analytic floor from the scheduler's real step sequence (stepped on the CPU) and the "
                "GPU's ceilings given above; no GPU time is measured here",
        "model": args.model, "num_requests": args.num_requests, "engine": GPU_ENGINE,
        "prefix_caching": not args.no_prefix_caching,
        "ceilings": {"matmul_tflops": args.tflops, "copy_gbps": args.bw_gbps}, "costs": costs,
        "steps": len(steps), "tokens": sum(n for rows in steps for _, n, _ in rows),
        "floor_s": round(total, 3), "floor_req_s": round(args.num_requests / total, 1),
        "sequential_s": round(sums["sequential"], 3),
        "sequential_req_s": round(args.num_requests / sums["sequential"], 1),
        "compute_only_s": round(sums["compute"], 3), "memory_only_s": round(sums["memory"], 3),
        "by_kind": by_kind,
    }
    if measured:
        report["measured"] = {"file": args.measured, "wall_ms": measured["wall_ms"], "steps": measured["steps"],
                              "wall_over_floor": round(measured["wall_ms"] / (total * 1e3), 3)}
    save_report("step-floor", report, "cpu", args.out)
    rows = [[name, k["steps"], k["compute_bound_steps"], k["floor_ms"], k["sequential_ms"],
             k.get("measured_ms", "-"), k.get("measured_over_floor", "-"), k.get("measured_over_sequential", "-")]
            for name, k in sorted(by_kind.items())]
    print_table(["kind", "steps", "compute-bound", "floor ms", "sequential ms", "measured ms", "/ floor",
                 "/ sequential"], rows,
                f"floor of the mix: {total:.2f} s = {args.num_requests / total:.1f} req/s; GEMMs then attention: "
                f"{sums['sequential']:.2f} s = {args.num_requests / sums['sequential']:.1f} req/s "
                f"({len(steps)} steps; at {args.tflops:.0f} TFLOP/s, {args.bw_gbps:.0f} GB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
