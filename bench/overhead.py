"""What the router and tokenizer tiers cost: TTFT and token throughput through the router vs straight
to the engine, in the same run, on the same engine, under the same load.

    python bench/overhead.py --model ../shared/models/stories260k --concurrency 1,8,64 \
        --out bench/results/overhead-<device>-<date>.json
    # a GPU engine (the GPU machine: `. scripts/device_env.sh` first):
    python3 bench/overhead.py --model $KVMESH_TEST_MODELS/stories260k --device cuda --out $OUT/overhead.json
    # the services of another checkout (an older commit, for a before/after on one machine):
    python bench/overhead.py --services-from /tmp/ov-base ...
    # before/after in ONE run: a second router and tokenizer from another checkout, same engine:
    python bench/overhead.py --compare-tiers-from /tmp/ov-base ...

For each concurrency level, rounds alternate between the paths (direct, router, router, direct,
...) so that drift in the machine's state hits both alike. --compare-per-request adds a third path:
a second router on one DetokenizeStream per request (`--detokenize per-request`), the code before
the shared DetokenizeSessions stream, measured in the same run; --compare-engine-stream likewise a
router on one Generate call per request to the engine (`--engine-stream per-request`, path
router_engine_per_request), the code before the shared GenerateStream. --compare-tiers-from CHECKOUT adds
a path "router_base": a router and a tokenizer run from that checkout's code, over the same engine,
so that a change to the router and tokenizer tiers is measured against its base in one run. Where
the engine offers GenerateStream, a path "direct_stream" sends the direct requests on one shared
GenerateStream (router/engine_stream.py, as the router does), the engine's cheapest client: the
tiers' cost against it is `router_vs_direct_stream`. The direct paths send the prompt's ids,
tokenized once beforehand (outside the timing); the router path sends the text, so its numbers
include tokenization, the choice of engine and streaming detokenization. Greedy, ignore_eos, a
fixed max_tokens: both paths generate exactly the same tokens.

--compare-unix-tokenizer adds a path "router_unix": the same router, dialing the same tokenizer on a
unix-domain socket (tokenizer_svc --unix-socket) instead of loopback TCP.

--router-workers N adds a path "router_workers": the same router as N processes on one port
(`router --workers N`, router/workers.py), beside the one-process router in the same run; its CPU per
token counts every worker.

--client-procs N spreads each phase's streams over N client processes (bench/overhead_clients.py):
one Python client receiving every stream's responses caps the router path before the router does
at high concurrency on a fast engine (`client_cpu_us_per_token` shows it).

--profile DIR samples the router and the tokenizer with py-spy while the levels run (raw stacks
and a summary of the hottest functions per process, under DIR).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime
import functools
import json
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.overhead_clients import PROMPT, ClientPool, open_paths, worker  # noqa: E402
from bench.provenance import cpu_name, git_commit, write_report  # noqa: E402
from kvmesh.launcher import tokenizer_socket  # noqa: E402
from kvmesh.procs import ServiceProcess, stop_all  # noqa: E402
from kvmesh.serving.channels import create_channel  # noqa: E402
from kvmesh.v1 import tokenizer_pb2, tokenizer_pb2_grpc  # noqa: E402

# One torch thread for a CPU engine (the tiers share the cores); no trace export without a collector.
CHILD_ENV = {"OMP_NUM_THREADS": "1", "OTEL_TRACES_EXPORTER": "none"}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads, and of its live child processes (a
    router's --workers) (Linux /proc)."""
    pids = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(_stat(int(entry))[1]) == pid:
                    pids.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue  # exited while we looked
    total = 0
    for p in pids:
        try:
            fields = _stat(p)
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


async def run_phase(run_streams, concurrency: int, per_worker: int, pids: dict[str, int]) -> dict:
    """One phase: `run_streams(concurrency, per_worker)` returns (samples, the clients' CPU seconds)."""
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    start = time.monotonic()
    samples, client_cpu = await run_streams(concurrency, per_worker)
    wall = time.monotonic() - start
    return {"samples": samples, "wall_s": wall, "client_cpu_s": client_cpu,
            "cpu_s": {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}}


def in_process(call_fn):
    """A path's streams run by this process."""
    async def run_streams(concurrency: int, per_worker: int) -> tuple[list, float]:
        samples: list = []
        cpu = time.process_time()
        await asyncio.gather(*(worker(call_fn, per_worker, samples) for _ in range(concurrency)))
        return samples, time.process_time() - cpu
    return run_streams


def merge(phases: list[dict]) -> dict:
    ttft = [s[0] for p in phases for s in p["samples"]]
    tokens = sum(s[1] for p in phases for s in p["samples"])
    wall = sum(p["wall_s"] for p in phases)
    # CPU per generated token of each service process: what the path costs, whatever else the
    # host runs (wall times on a shared host mostly measure the other work).
    cpu_us = {name: round(1e6 * sum(p["cpu_s"][name] for p in phases) / tokens, 1) for name in phases[0]["cpu_s"]}
    return {"requests": len(ttft), "ttft_p50_ms": round(percentile(ttft, 50) * 1e3, 3),
            "ttft_p99_ms": round(percentile(ttft, 99) * 1e3, 3), "ttft_mean_ms": round(sum(ttft) / len(ttft) * 1e3, 3),
            "throughput_tok_s": round(tokens / wall, 1), "tokens": tokens, "wall_s": round(wall, 3),
            # Responses the client received per request: below max_tokens when tokens were coalesced.
            "responses_per_request": round(sum(s[3] for p in phases for s in p["samples"]) / len(ttft), 2),
            "cpu_us_per_token": cpu_us, "cpu_us_per_token_all_tiers": round(sum(cpu_us.values()), 1),
            # The client processes' own (this one, or --client-procs): one message per response on a
            # router stream, one per engine step for all requests on direct_stream.
            "client_cpu_us_per_token": round(1e6 * sum(p["client_cpu_s"] for p in phases) / tokens, 1)}


def requests_per_worker(concurrency: int, override: int | None) -> int:
    """8 sequential requests per stream at low concurrency, fewer at high (a phase stays seconds long)."""
    return override if override else max(2, min(8, 64 // concurrency))


def _compare(path: dict, direct: dict) -> dict:
    return {"ttft_added_p50_ms": round(path["ttft_p50_ms"] - direct["ttft_p50_ms"], 3),
            "throughput_ratio": round(path["throughput_tok_s"] / direct["throughput_tok_s"], 4),
            # What the router and tokenizer tiers add to the CPU cost of a token (the engine's own
            # share on the router path included: it attaches load reports there).
            "cpu_added_us_per_token": round(path["cpu_us_per_token_all_tiers"] - direct["cpu_us_per_token_all_tiers"], 1)}


async def measure(procs: dict[str, ServiceProcess], levels: list[int], rounds: int, per_worker: int | None,
                  max_tokens: int, client_procs: int = 1, router_channels: int = 1) -> dict:
    """Rounds rotate the order of the paths (direct, router[, router_per_request, router_base]) so drift
    hits all alike."""
    routers = [name for name in ROUTER_PATHS if name in procs]
    pids = {name: proc.pid for name, proc in procs.items()}
    addresses = {"engine": procs["engine"].address, **{name: procs[name].address for name in routers}}
    async with contextlib.AsyncExitStack() as stack:
        tc = await stack.enter_async_context(create_channel(procs["tokenizer"].address))
        ids = list((await tokenizer_pb2_grpc.TokenizerStub(tc).Tokenize(
            tokenizer_pb2.TokenizeRequest(text=PROMPT))).token_ids)
        if client_procs > 1:
            pool = ClientPool(client_procs, addresses, ids, max_tokens, router_channels)
            stack.callback(pool.close)
            paths = {name: functools.partial(pool.run, name) for name in pool.paths}
        else:
            paths = {name: in_process(fn) for name, fn in (await open_paths(stack, addresses, ids, max_tokens,
                                                                                 router_channels)).items()}
        for fn in paths.values():  # warm up every path (connections, caches)
            await run_phase(fn, 4, 2, pids)
        results = {}
        order = list(paths)
        for c in levels:
            n = requests_per_worker(c, per_worker)
            phases = {name: [] for name in paths}
            for r in range(rounds):
                rotated = order[r % len(order):] + order[:r % len(order)]
                for name in (rotated if r % 2 == 0 else rotated[::-1]):
                    phases[name].append(await run_phase(paths[name], c, n, pids))
            merged = {name: merge(p) for name, p in phases.items()}
            level = {"requests_per_stream_per_round": n, **merged, **_compare(merged["router"], merged["direct"])}
            for name in routers[1:]:
                level[f"{name}_vs_direct"] = _compare(merged[name], merged["direct"])
                level[f"{name}_vs_router"] = _compare(merged[name], merged["router"])
            if "direct_stream" in merged:  # what the tiers cost against the engine's cheapest client
                for name in routers:
                    level[f"{name}_vs_direct_stream"] = _compare(merged[name], merged["direct_stream"])
            results[f"concurrency_{c}"] = level
            print(f"concurrency {c}: {json.dumps(level)}", flush=True)
        return results


# The router paths measured beside the direct one, in this order (those started).
ROUTER_PATHS = ("router", "router_workers", "router_per_request", "router_engine_per_request", "router_unix",
                "router_base")


def tokenizer_unix_socket(log_dir: pathlib.Path) -> pathlib.Path:
    """Where start_mesh's tokenizer also listens with --compare-unix-tokenizer: where `kvmesh up` puts it."""
    path = tokenizer_socket(str(log_dir))
    if path is None:
        raise SystemExit(f"--compare-unix-tokenizer: {log_dir} is too long a path for a unix socket (--log-dir)")
    return pathlib.Path(path)


def start_mesh(args, log_dir: pathlib.Path, tree: pathlib.Path,
               base_tree: pathlib.Path | None = None) -> list[ServiceProcess]:
    """Tokenizer, one engine and a router over it, all healthy, run from `tree`'s code; with
    `base_tree`, a second tokenizer and router from that tree over the same engine."""
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []

    def start(kind: str, name: str, flags: list[str], code: pathlib.Path = tree) -> ServiceProcess:
        env = {**CHILD_ENV, "PYTHONPATH": os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")])}
        proc = ServiceProcess(kind, name, flags, env=env, log_path=str(log_dir / f"{name}.log"), die_with_parent=True)
        cwd = os.getcwd()
        os.chdir(code)  # `python -m` finds the tree's packages first
        try:
            proc.start()
        finally:
            os.chdir(cwd)
        procs.append(proc)
        return proc

    # --compare-unix-tokenizer: the tokenizer also listens on a unix socket, a second router dials it there
    unix_socket = tokenizer_unix_socket(log_dir) if args.compare_unix_tokenizer else None
    if unix_socket is not None:
        unix_socket.unlink(missing_ok=True)  # a bind needs a fresh path
    try:
        tok = start("tokenizer", "tokenizer",
                    ["--model", args.model, *(["--unix-socket", str(unix_socket)] if unix_socket else [])])
        engine = start("engine", "engine", ["--model", args.model, "--device", args.device,
                                            "--num-gpu-blocks-override", str(args.blocks)])
        base_tok = start("tokenizer", "tokenizer_base", ["--model", args.model], base_tree) if base_tree else None
        for proc in procs:
            proc.wait_healthy(600)
        router_flags = ["--tokenizer", tok.address, "--engines", engine.address, "--log-level", "WARNING"]
        start("router", "router", router_flags)
        if args.router_workers > 1:  # the same router as N processes on one port (router/workers.py)
            start("router", "router_workers", [*router_flags, "--workers", str(args.router_workers)])
        if args.compare_per_request:  # the same router on one DetokenizeStream per request
            start("router", "router_per_request", [*router_flags, "--detokenize", "per-request"])
        if args.compare_engine_stream:  # the same router on one Generate call per request to the engine
            start("router", "router_engine_per_request", [*router_flags, "--engine-stream", "per-request"])
        if unix_socket is not None:  # the same router, its tokenizer hops on the unix socket
            start("router", "router_unix", [*router_flags, "--tokenizer", f"unix:{unix_socket}"])  # the later wins
        if base_tok is not None:
            start("router", "router_base", ["--tokenizer", base_tok.address, "--engines", engine.address,
                                            "--log-level", "WARNING"], base_tree)
        for proc in procs:
            proc.wait_healthy(120)
    except BaseException:
        stop_all(procs)
        raise
    return procs


class Profiler:
    """py-spy sampling the given processes while the levels run (a no-op without a directory)."""

    def __init__(self, out_dir: str | None, procs: list[ServiceProcess]):
        self._dir = pathlib.Path(out_dir) if out_dir else None
        self._procs = procs
        self._spies: list[tuple[str, subprocess.Popen, pathlib.Path]] = []

    def __enter__(self) -> "Profiler":
        if self._dir is None:
            return self
        spy = shutil.which("py-spy") or str(pathlib.Path(sys.executable).parent / "py-spy")
        self._dir.mkdir(parents=True, exist_ok=True)
        for proc in self._procs:
            raw = self._dir / f"{proc.name}.raw.txt"
            # --subprocesses: a router's --workers (the parent itself only waits)
            cmd = [spy, "record", "--pid", str(proc.pid), "--format", "raw", "--rate", "200", "--nonblocking",
                   "--subprocesses", "-o", str(raw)]
            self._spies.append((proc.name, subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                                            stderr=subprocess.DEVNULL), raw))
        time.sleep(1.0)  # py-spy attaches
        return self

    def __exit__(self, *exc) -> None:
        for name, spy, raw in self._spies:
            spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
            spy.wait(30)
            if raw.exists():
                (self._dir / f"{name}.summary.txt").write_text(summarize_stacks(raw.read_text()))


_LINE = re.compile(r":\d+\)$")  # "fn (file.py:12)" -> "fn (file.py)": one entry per function


def summarize_stacks(raw: str, top: int = 30) -> str:
    """The hottest functions of py-spy raw output ("frame;frame;... count" per line): share of
    samples in which each function is on the stack (inclusive) and at the top (self)."""
    inclusive, own = collections.Counter(), collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n, frames = int(count), [_LINE.sub(")", f) for f in stack.split(";")[1:]]  # [0]: the process
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    if not total:
        return "no samples\n"
    lines = [f"{total} samples", "", "inclusive %  function"]
    lines += [f"{100 * c / total:10.1f}  {f}" for f, c in inclusive.most_common(top)]
    lines += ["", "self %  function"]
    lines += [f"{100 * c / total:6.1f}  {f}" for f, c in own.most_common(top)]
    return "\n".join(lines) + "\n"


def tree_commit(tree: pathlib.Path) -> str:
    """HEAD of a checkout, with "+dirty" when its tracked files differ from it (this checkout on the
    GPU machine: KVMESH_COMMIT, as bench.provenance reads it; a .git there is stale)."""
    if tree == REPO and os.environ.get("KVMESH_COMMIT"):
        return git_commit()
    head = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return head + ("+dirty" if head and dirty else "")


def environment(args, tree: pathlib.Path) -> dict:
    """Device, date and the commit of the services measured, for the results file."""
    device = f"cpu: {cpu_name()} x{os.cpu_count()}"
    if args.device.startswith("cuda"):
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True).stdout.strip().splitlines()
        device = f"{args.device}: {gpu[0] if gpu else 'unknown GPU'}; host {device}"
    commit = tree_commit(tree)
    return {"device": device, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": commit or "unknown", "python": platform.python_version(),
            "loadavg_1m_at_end": round(os.getloadavg()[0], 2)}  # other work on a shared machine shows here


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO.parent / "shared" / "models" / "stories260k"))
    parser.add_argument("--device", default="cpu", help="the engine's --device (cpu, cuda, cuda:N)")
    parser.add_argument("--blocks", type=int, default=512, help="KV blocks of the engine")
    parser.add_argument("--concurrency", default="1,8,64", help="concurrent streams per level")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds per path and level")
    parser.add_argument("--per-worker", type=int, default=None,
                        help="sequential requests per stream per round (default: 8, fewer above 8 streams)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--services-from", default=str(REPO), help="checkout whose services are measured")
    parser.add_argument("--compare-per-request", action="store_true",
                        help="also measure a router on per-request DetokenizeStreams (--detokenize per-request)")
    parser.add_argument("--compare-engine-stream", action="store_true",
                        help="also measure a router on one Generate call per request to the engine "
                             "(--engine-stream per-request; path router_engine_per_request)")
    parser.add_argument("--compare-unix-tokenizer", action="store_true",
                        help="also measure a router that dials the tokenizer on a unix-domain socket (path router_unix)")
    parser.add_argument("--router-workers", type=int, default=1,
                        help="also measure a router of N processes on one port (`--workers N`; path router_workers)")
    parser.add_argument("--router-channels", type=int, default=None,
                        help="client channels (TCP connections) per router path and client process, calls spread "
                             "round-robin (default: 1; 4 per worker with --router-workers, for every router path)")
    parser.add_argument("--compare-tiers-from", default=None,
                        help="also measure a router and tokenizer run from this checkout (path router_base), same engine")
    parser.add_argument("--profile", default=None, help="directory for py-spy profiles of router and tokenizer")
    parser.add_argument("--client-procs", type=int, default=1,
                        help="client processes sharing each phase's streams (bench/overhead_clients.py)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--log-dir", default="/tmp/kvmesh-bench-overhead")
    args = parser.parse_args()

    if args.router_channels is None:  # workers share connections out: give each several
        args.router_channels = 4 * args.router_workers if args.router_workers > 1 else 1
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    tree = pathlib.Path(args.services_from).resolve()
    base_tree = pathlib.Path(args.compare_tiers_from).resolve() if args.compare_tiers_from else None
    args.model = str(pathlib.Path(args.model).resolve())  # relative to the working directory
    if not (pathlib.Path(args.model) / "config.json").exists():
        parser.error(f"--model {args.model}: no config.json there (a HuggingFace model directory)")
    procs = start_mesh(args, pathlib.Path(args.log_dir), tree, base_tree)
    try:
        levels = [int(c) for c in args.concurrency.split(",")]
        by_name = {p.name: p for p in procs}
        profiled = [by_name[name] for name in ("router", "tokenizer", "router_workers", "router_base", "tokenizer_base")
                    if name in by_name]
        with Profiler(args.profile, profiled):
            results = asyncio.run(measure(by_name, levels, args.rounds, args.per_worker, args.max_tokens,
                                          args.client_procs, args.router_channels))
    finally:
        stop_all(procs)
    report = {"bench": "overhead", **environment(args, tree), "loadavg_at_start": load_at_start, "model": pathlib.Path(args.model).name,
              **({"base_git_commit": tree_commit(base_tree), "base_tree": str(base_tree)} if base_tree else {}),
              "engine_device": args.device,
              "workload": {"prompt": PROMPT, "max_tokens": args.max_tokens, "temperature": 0.0, "ignore_eos": True,
                           "rounds": args.rounds, "engine_kv_blocks": args.blocks, "client_procs": args.client_procs,
                           "router_workers": args.router_workers, "router_channels": args.router_channels,
                           "compare_unix_tokenizer": args.compare_unix_tokenizer},
              "note": "ttft = time to the first generated token as the client sees it; the router path includes "
                      "Tokenize, the engine choice and streaming detokenization (router: the shared DetokenizeSessions "
                      "stream, and the shared GenerateStream to the engine where the router and engine have it; router_per_request, when measured: one DetokenizeStream per request; "
                      "router_engine_per_request, when measured: one Generate call per request to the engine; router_workers, when measured: "
                      "the router as --workers N processes on one port (its CPU: all its processes); router_base, when measured: "
                      "a router and tokenizer of base_git_commit over the same engine); the direct path sends ids tokenized once "
                      "beforehand (direct: one Generate call per request; direct_stream, where the engine has it: the "
                      "requests on one shared GenerateStream, the engine's cheapest client). All tiers and the client "
                      "share the host's cores.",
              "results": results}
    write_report(report, args.out)


if __name__ == "__main__":
    sys.exit(main())
