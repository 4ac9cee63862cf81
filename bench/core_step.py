"""CPU cost of one engine step outside the model runner: scheduler + engine core + block manager +
output bookkeeping (+ the load snapshot the engine loop takes every step), with a runner that costs
nothing.

    python bench/core_step.py                        # this tree
    python bench/core_step.py --baseline 5e9c127     # that commit's engine_svc/ + kvmesh/ beside this tree

Why it matters: with async scheduling the engine plans step N+1 while the GPU runs step N, so this
cost must stay well under a GPU step (8B decode: ~4.8 ms at batch 1, ~15 ms at batch 256; 1B: 1-3 ms)
at every batch size.

Scenarios (all with async scheduling, as on CUDA, and ignore_eos):
  decode-B   steady decode at batch B (1, 8, 64, 256, 512), prompts of 64..1024 tokens (seeded), so
             rows cross block boundaries on different steps; prefix caching on and off. Timed:
             --decode-steps steps after every request has left prefill.
  sharegpt   the issue-10 mix (bench/harness.py sharegpt_mix: 1000 requests, all queued at t=0),
             max_num_seqs 256, max_num_batched_tokens 8192, max_model_len 4096, prefix caching on:
             every step from the first to the last. 32768 KV blocks (no preemption, as on the
             H200); sharegpt-2048 has 2048 blocks, so admission waits and requests get preempted.

Per step: thread CPU time (time.thread_time_ns: what this thread spent, not what the other tenants
of a shared machine took) of EngineCore.step() minus the fake runner's own share, and of
EngineCore.load(). Reported as median / p90 microseconds, and the sharegpt run's total seconds.

The fake runner keeps the rows the persistent batch would (from new_seqs / new_block_ids /
removed_ids), asserts every row's block table covers what it computes, samples a token that depends
only on (request, position), and hashes every plan: equal `plan_digest`s mean the two trees made
the same scheduling decisions step for step, and equal `output_digest`s the same tokens.

With --baseline REV, the commit's engine_svc/ and kvmesh/ are exported to a temporary directory and
each scenario runs in a subprocess against them and against this tree, alternating --repeats times
(the best median per side is kept: noise on a shared machine only ever adds time).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

_ROOT = os.environ.get("KVMESH_CORE_ROOT")  # set by --baseline: import the engine from there
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)
if _ROOT:
    sys.path.insert(0, _ROOT)

from engine_svc.core.engine_core import EngineCore  # noqa: E402
from engine_svc.core.request import Request  # noqa: E402
from engine_svc.sampling_params import SamplingParams  # noqa: E402
from engine_svc.step import SampledToken  # noqa: E402

VOCAB = 128256  # Llama 3
BLOCK_SIZE = 16
DECODE_BATCHES = (1, 8, 64, 256, 512)


class _Handle:
    __slots__ = ("_runner", "_results")

    def __init__(self, runner: "FakeRunner", results: list):
        self._runner, self._results = runner, results

    def result(self) -> list:
        return self._results


class FakeRunner:
    """A model runner that returns at once: launch(plan) and execute(seqs), with the row bookkeeping
    of a persistent batch (checked, and timed so that the benchmark can subtract it)."""

    def __init__(self):
        self.rows: dict[str, list] = {}  # request id -> [next position, block table, tag]
        self.cpu_ns = 0
        self.plans = hashlib.blake2b(digest_size=8)
        self.tokens = hashlib.blake2b(digest_size=8)

    @staticmethod
    def _token(tag: int, pos: int) -> int:
        return 3 + (tag * 1000003 + pos * 7919) % (VOCAB - 3)

    def launch(self, plan):
        t0 = time.thread_time_ns()
        rows = self.rows
        for rid in plan.removed_ids:
            rows.pop(rid, None)
        for seq in plan.new_seqs:
            rows[seq.request_id] = [seq.start_pos, list(seq.block_ids), int(seq.request_id.rsplit("-", 1)[1])]
        for rid, blocks in plan.new_block_ids:
            rows[rid][1].extend(blocks)
        results = []
        for rid, n, sample in zip(plan.req_ids, plan.num_new_tokens, plan.sample):
            row = rows[rid]
            row[0] += n
            assert len(row[1]) * BLOCK_SIZE >= row[0], f"{rid}: block table too short for {row[0]} tokens"
            results.append(SampledToken(self._token(row[2], row[0])) if sample else None)
        self.plans.update(repr((plan.req_ids, plan.num_new_tokens, plan.sample, plan.new_block_ids,
                                [s.request_id for s in plan.new_seqs], plan.removed_ids)).encode())
        self.tokens.update(repr([r.token_id if r else -1 for r in results]).encode())
        self.cpu_ns += time.thread_time_ns() - t0
        return _Handle(self, results)

    def execute(self, seqs):
        t0 = time.thread_time_ns()
        out = [SampledToken(self._token(int(s.request_id.rsplit("-", 1)[1]), s.start_pos + len(s.new_token_ids)))
               if s.sample else None for s in seqs]
        self.cpu_ns += time.thread_time_ns() - t0
        return out


def _core(runner: FakeRunner, *, num_blocks: int, max_num_seqs: int, prefix: bool,
          max_model_len: int = 4096, max_num_batched_tokens: int = 8192) -> EngineCore:
    return EngineCore(runner, num_blocks=num_blocks, block_size=BLOCK_SIZE, eos_token_ids=[2],
                      max_model_len=max_model_len, max_num_batched_tokens=max_num_batched_tokens,
                      max_num_seqs=max_num_seqs, enable_prefix_caching=prefix, async_scheduling=True)


def _timed_step(core: EngineCore, runner: FakeRunner, step_us: list, load_us: list, batch: list) -> None:
    runner_before = runner.cpu_ns
    t0 = time.thread_time_ns()
    core.step()
    t1 = time.thread_time_ns()
    core.load()
    t2 = time.thread_time_ns()
    step_us.append((t1 - t0 - (runner.cpu_ns - runner_before)) / 1e3)
    load_us.append((t2 - t1) / 1e3)
    batch.append(len(core.scheduler.running))


def _summary(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"median_us": round(statistics.median(ordered), 1),
            "p90_us": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 1),
            "mean_us": round(statistics.fmean(ordered), 1)}


def decode(batch: int, prefix: bool, steps: int, seed: int = 1) -> dict:
    """Steady decode at `batch` rows: every request past prefill, `steps` steps timed."""
    rng = random.Random(seed)
    lens = [rng.randint(64, 1024) for _ in range(batch)]
    max_tokens = steps + 64  # the timed window ends before any request does
    runner = FakeRunner()
    core = _core(runner, num_blocks=sum(-(-(n + max_tokens) // BLOCK_SIZE) for n in lens) + 64,
                 max_num_seqs=max(256, batch), prefix=prefix)
    for i, n in enumerate(lens):
        core.add(Request(f"d-{i}", [rng.randrange(3, VOCAB) for _ in range(n)],
                         SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)))
    while any(r.num_output_tokens < 2 for r in core.requests.values()):
        core.step()
    step_us, load_us, rows = [], [], []
    for _ in range(steps):
        _timed_step(core, runner, step_us, load_us, rows)
    assert min(rows) == batch, "a request finished inside the timed window"
    return {"scenario": f"decode-{batch}", "batch": batch, "prefix_caching": prefix, "steps": steps,
            "step": _summary(step_us), "load": _summary(load_us),
            "plan_digest": runner.plans.hexdigest(), "output_digest": runner.tokens.hexdigest()}


def sharegpt(num_requests: int, prefix: bool = True, num_blocks: int = 32768) -> dict:
    """The issue-10 mix, queued at t=0, stepped to the end."""
    from bench.harness import GPU_ENGINE, sharegpt_mix

    work = sharegpt_mix(num_requests, VOCAB, GPU_ENGINE["max_model_len"])
    runner = FakeRunner()
    # The 8B shape leaves an H200 more KV than this mix holds at once: 32768 blocks (512k tokens)
    # never preempt, like the GPU run. A smaller cache (sharegpt-N) makes admission wait and
    # running requests be preempted, so that the digests cover those paths too.
    core = _core(runner, num_blocks=num_blocks, prefix=prefix, **GPU_ENGINE)
    for i, (prompt, n) in enumerate(work):
        core.add(Request(f"s-{i}", prompt, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)))
    step_us, load_us, rows = [], [], []
    while core.has_work:
        _timed_step(core, runner, step_us, load_us, rows)
    by_batch = {}
    for lo, hi in ((0, 64), (64, 192), (192, 256), (256, 257)):
        sel = [s for s, b in zip(step_us, rows) if lo <= b < hi]
        if sel:
            by_batch[f"{lo}-{hi - 1}"] = {"steps": len(sel), **_summary(sel)}
    return {"scenario": "sharegpt" if num_blocks == 32768 else f"sharegpt-{num_blocks}",
            "num_requests": num_requests, "prefix_caching": prefix, "num_blocks": num_blocks,
            "steps": len(step_us), "step": _summary(step_us), "load": _summary(load_us),
            "total_step_s": round(sum(step_us) / 1e6, 3), "total_load_s": round(sum(load_us) / 1e6, 3),
            "step_by_running": by_batch, "preemptions": core.scheduler.num_preemptions,
            "plan_digest": runner.plans.hexdigest(), "output_digest": runner.tokens.hexdigest()}


def run_cases(cases: list[str], decode_steps: int, num_requests: int) -> list[dict]:
    results = []
    for case in cases:
        name, _, flag = case.partition(":")
        prefix = flag != "noprefix"
        if name.startswith("sharegpt"):
            blocks = name.partition("-")[2]
            results.append(sharegpt(num_requests, prefix, int(blocks) if blocks else 32768))
        else:
            results.append(decode(int(name.split("-")[1]), prefix, decode_steps))
    return results


def all_cases(include_sharegpt: bool = True) -> list[str]:
    cases = [f"decode-{b}:{p}" for b in DECODE_BATCHES for p in ("prefix", "noprefix")]
    return cases + (["sharegpt:prefix", "sharegpt-2048:prefix"] if include_sharegpt else [])


def _subprocess(root: str | None, cases: list[str], args) -> list[dict]:
    env = dict(os.environ)
    env.pop("KVMESH_CORE_ROOT", None)
    if root:
        env["KVMESH_CORE_ROOT"] = root
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([sys.executable, os.path.abspath(__file__), "--cases", *cases, "--json-out", f.name,
                        "--decode-steps", str(args.decode_steps), "--num-requests", str(args.num_requests)],
                       env=env, check=True)
        return json.load(open(f.name))


def _best(runs: list[list[dict]]) -> list[dict]:
    """Per case, the run with the lowest median step time (digests must agree across runs)."""
    best = []
    for same in zip(*runs):
        assert len({r["plan_digest"] for r in same}) == 1, "one tree scheduled differently between runs"
        best.append(min(same, key=lambda r: r["step"]["median_us"]))
    return best


def compare(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", _REPO, "archive", args.baseline, "engine_svc", "kvmesh"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        before, after = [], []
        for _ in range(args.repeats):
            before.append(_subprocess(tmp, args.cases, args))
            after.append(_subprocess(None, args.cases, args))
    rows = []
    for b, a in zip(_best(before), _best(after)):
        rows.append({"scenario": b["scenario"], "prefix_caching": b["prefix_caching"], "before": b, "after": a,
                     "step_median_ratio": round(b["step"]["median_us"] / max(a["step"]["median_us"], 1e-3), 2),
                     "same_plans": b["plan_digest"] == a["plan_digest"],
                     "same_tokens": b["output_digest"] == a["output_digest"]})
    return {"baseline_commit": args.baseline, "repeats": args.repeats, "cases": rows}


def _print(report: dict) -> None:
    from bench.harness import print_table

    if "cases" in report:
        print_table(["scenario", "prefix", "before med/p90 us", "after med/p90 us", "ratio",
                     "load before/after us", "same plans/tokens"],
                    [[r["scenario"], r["prefix_caching"],
                      f"{r['before']['step']['median_us']} / {r['before']['step']['p90_us']}",
                      f"{r['after']['step']['median_us']} / {r['after']['step']['p90_us']}", r["step_median_ratio"],
                      f"{r['before']['load']['median_us']} / {r['after']['load']['median_us']}",
                      f"{r['same_plans']} / {r['same_tokens']}"] for r in report["cases"]],
                    "CPU us per engine step outside the runner (thread time; median / p90)")
        for r in report["cases"]:
            if r["scenario"].startswith("sharegpt"):
                print(f"{r['scenario']} total step CPU: before {r['before']['total_step_s']} s, "
                      f"after {r['after']['total_step_s']} s over {r['after']['steps']} steps "
                      f"({r['after']['preemptions']} preemptions)")
    else:
        print_table(["scenario", "prefix", "step med/p90 us", "load med us", "steps"],
                    [[r["scenario"], r["prefix_caching"], f"{r['step']['median_us']} / {r['step']['p90_us']}",
                      r["load"]["median_us"], r["steps"]] for r in report["results"]])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=all_cases(),
                   help="decode-B:prefix|noprefix, sharegpt:prefix (default: all)")
    p.add_argument("--decode-steps", type=int, default=256)
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--baseline", default=None, help="a commit to compare against, side by side")
    p.add_argument("--repeats", type=int, default=2, help="with --baseline: alternating runs per side")
    p.add_argument("--json-out", default=None, help="raw results only (used by --baseline's subprocesses)")
    p.add_argument("--out", default=None, help="results file (default bench/results/core-step-cpu-<date>.json)")
    args = p.parse_args()
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(run_cases(args.cases, args.decode_steps, args.num_requests), f)
        return
    from bench import harness

    report = compare(args) if args.baseline else {"results": run_cases(args.cases, args.decode_steps,
                                                                         args.num_requests)}
    report["note"] = ("CPU cost of EngineCore.step() outside the runner (fake runner subtracted) and of "
                      "EngineCore.load(), thread CPU time on a shared 2-core host: absolute numbers are this "
                      "host's, the before/after ratio is the finding")
    full, paths = harness.save_report("core-step", report, "cpu", args.out)
    _print(full)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
