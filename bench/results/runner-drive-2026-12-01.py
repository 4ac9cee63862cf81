"""(Kept as the driver of bench/results/runner-h200-2026-12-01.json.) Runner engineer's GPU driver: issue-10 mix, profiler GPU busy, batch-1 decode, B=256 decode.

python scratch/drive.py --out OUT.json [--num 1000] [--temps 0,1] [--profile] [--b1] [--b256]
Runs against whatever engine_svc is on sys.path (cwd). Drives EngineCore directly.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.getcwd())
import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine_svc.config import EngineConfig  # noqa: E402
from engine_svc.core.request import Request  # noqa: E402
from engine_svc.engine_loop import build_engine_core  # noqa: E402
from engine_svc.sampling_params import SamplingParams  # noqa: E402

MODEL = os.environ.get("DRIVE_MODEL", "bench/configs/llama3-8b")
DEV = os.environ.get("DRIVE_DEVICE", "cuda")


def mix(n, seed=0, mean_in=215, mean_out=197, sigma=1.0, max_len=4096, vocab=128256):
    rng = np.random.default_rng(seed)
    mu_in, mu_out = math.log(mean_in) - sigma ** 2 / 2, math.log(mean_out) - sigma ** 2 / 2
    ins = np.clip(np.round(rng.lognormal(mu_in, sigma, n)), 4, 2048).astype(int)
    outs = np.clip(np.round(rng.lognormal(mu_out, sigma, n)), 1, None).astype(int)
    outs = np.minimum(outs, max_len - ins)
    return [(rng.integers(3, vocab, int(i)).tolist(), int(o)) for i, o in zip(ins, outs)]


def run_reqs(core, work, temp, tag):
    for i, (p, o) in enumerate(work):
        core.add(Request(f"{tag}{i}", list(p), SamplingParams(temperature=temp, max_tokens=o, ignore_eos=True)))
    steps, out_toks, t0 = 0, 0, time.perf_counter()
    walls = []
    while core.has_work:
        s = time.perf_counter()
        for o in core.step():
            out_toks += len(o.tokens)
        walls.append(time.perf_counter() - s)
        steps += 1
    if DEV == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, steps, out_toks, walls


def gpu_busy(core, work, temp, skip=60, window=40):
    """Profile `window` steps after `skip` steps: union of kernel intervals / wall."""
    from torch.profiler import ProfilerActivity, profile
    for i, (p, o) in enumerate(work):
        core.add(Request(f"p{i}", list(p), SamplingParams(temperature=temp, max_tokens=o, ignore_eos=True)))
    for _ in range(skip):
        core.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(window):
            core.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    ivs = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                 if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, cur_s, cur_e = 0.0, None, None
    for s, e in ivs:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        busy += cur_e - cur_s
    top = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    while core.has_work:
        core.step()
    return dict(window_steps=window, wall_ms_per_step=wall * 1e3 / window,
                busy_ms_per_step=busy / 1e3 / window, busy_frac=busy / 1e6 / wall, n_kernels=len(ivs)), top


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--temps", default="0")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--b1", action="store_true")
    ap.add_argument("--b256", action="store_true")
    a = ap.parse_args()
    res = dict(device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu", date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               commit=os.environ.get("KVMESH_COMMIT", "unknown"), tree=os.getcwd())
    t0 = time.perf_counter()
    cfg = EngineConfig(model=MODEL, device=DEV, dtype="bfloat16" if DEV == "cuda" else "float32", load_format="dummy" if DEV == "cuda" else "auto", max_num_seqs=256,
                       max_num_batched_tokens=8192, max_model_len=4096, gpu_memory_utilization=0.9)
    if os.environ.get("DRIVE_ASYNC") and hasattr(cfg, "async_scheduling"):
        cfg.async_scheduling = os.environ["DRIVE_ASYNC"] == "1"
    cfg.validate()
    res["async"] = getattr(cfg, "overlap", False)
    core, _ = build_engine_core(cfg)
    res["startup_s"] = time.perf_counter() - t0
    res["num_blocks"] = core.block_manager.num_blocks
    print("startup", res["startup_s"], "blocks", res["num_blocks"], flush=True)
    run_reqs(core, mix(64, seed=1), 0.0, "w")  # warm
    work = mix(a.num)
    for t in [float(x) for x in a.temps.split(",") if x]:
        wall, steps, toks, walls = run_reqs(core, work, t, f"t{t}-")
        res[f"mix_temp{t}"] = dict(req_s=a.num / wall, out_tok_s=toks / wall,
                                  total_tok_s=(toks + sum(len(p) for p, _ in work)) / wall, steps=steps,
                                  wall_s=wall, step_ms_median=1e3 * float(np.median(walls)))
        print(f"temp {t}", res[f"mix_temp{t}"], flush=True)
    if a.profile:
        for t in (0.0, 1.0):
            stats, top = gpu_busy(core, mix(400, seed=2), t)
            res[f"busy_temp{t}"] = stats
            print(f"busy temp {t}", stats, flush=True)
            print(top, flush=True)
    if a.b1:
        p = list(range(1000, 1128))
        core.add(Request("b1", p, SamplingParams(temperature=0.0, max_tokens=257, ignore_eos=True)))
        walls = []
        while core.has_work:
            s = time.perf_counter()
            core.step()
            walls.append(time.perf_counter() - s)
        torch.cuda.synchronize()
        dec = walls[8:]
        res["b1_decode_ms_per_token"] = 1e3 * sum(dec) / len(dec)
        res["b1_floor_ms"] = 16.06e9 / 4235e9 * 1e3
        print("b1", res["b1_decode_ms_per_token"], flush=True)
    if a.b256:
        rng = np.random.default_rng(3)
        for i in range(256):
            core.add(Request(f"d{i}", rng.integers(3, 128000, 1024).tolist(),
                             SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)))
        walls = []
        while core.has_work:
            s = time.perf_counter()
            core.step()
            walls.append(time.perf_counter() - s)
        dec = walls[-50:-10]
        res["b256_ctx1024_decode_ms"] = 1e3 * float(np.median(dec))
        print("b256", res["b256_ctx1024_decode_ms"], flush=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
