"""Tokenizer tier throughput: loopback gRPC against the `tokenizers` library in-process, one run.

    python bench/tokenizer.py --model ../shared/models/stories260k --out bench/results/tokenizer-cpu-<date>.json

The service runs as its own process (as in a deployment: `python -m tokenizer_svc.server`); the
client is grpc.aio in this process. Measured, each `--repeats` times, medians reported:
  * Tokenize: documents of TinyStories text (with some non-ASCII) encoded one request each, one
    request in flight and `--concurrency` in flight; against `Tokenizer.encode` in a loop and
    `encode_batch` (Rust threads).
  * DetokenizeStream: `--streams` concurrent streams, each fed its ids one per message in lockstep
    (write a batch, read its answer, as the router does), also 16 ids per message; against our
    StreamDetokenizer in-process, `tokenizers.decoders.DecodeStream`, and one-shot decode.
Throughput is tokens per second of wall time, and tokens per CPU-second (client and server
processes together), which is the steadier number on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import pathlib
import random
import statistics
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.provenance import write_report  # noqa: E402
from kvmesh.procs import ServiceProcess  # noqa: E402
from kvmesh.serving.channels import create_channel  # noqa: E402
from kvmesh.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc  # noqa: E402
from tokenizer_svc.loader import load_tokenizer  # noqa: E402
from tokenizer_svc.stream import StreamDetokenizer  # noqa: E402

# bench/router.py's environment() (device, date, commit), loaded by path: as a module named
# `router` it would shadow the router package.
_spec = importlib.util.spec_from_file_location("bench_router", REPO / "bench" / "router.py")
bench_router = importlib.util.module_from_spec(_spec)
sys.modules["bench_router"] = bench_router  # dataclasses look their module up there
_spec.loader.exec_module(bench_router)

EXTRA = ["Grüße aus München!", "Ben saw a 🐸 in the pond.", "Ça va? Très bien.", "東京 and 大阪 are cities.",
         "The price was €5 👍🏽.", "Tim said, \"Let's play!\"\n"]


def make_documents(model_dir: str, count: int, seed: int = 0) -> list[str]:
    """Seeded documents of ~1 KB: sentences of the fixture's greedy outputs plus non-ASCII lines."""
    sentences = list(EXTRA)
    examples = pathlib.Path(model_dir) / "greedy_examples.json"
    if examples.is_file():
        for example in json.loads(examples.read_text())["examples"]:
            sentences += [s.strip() + "." for s in example["expected_text"].split(".") if s.strip()]
    rng = random.Random(seed)
    docs = []
    for _ in range(count):
        parts: list[str] = []
        while sum(map(len, parts)) < 1000:
            parts.append(rng.choice(sentences))
        docs.append(" ".join(parts))
    return docs


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of another process, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Meter:
    """Wall and CPU seconds of one measurement. CPU counts this process (all threads) and the
    server process, so tokens per CPU-second holds up on a machine shared with other work, where
    wall-clock rates swing with the load."""

    def __init__(self, server_pid: int | None = None):
        self._pid = server_pid

    def _cpu(self) -> float:
        return time.process_time() + (process_cpu_s(self._pid) if self._pid else 0.0)

    def __enter__(self) -> "Meter":
        self._wall0, self._cpu0 = time.perf_counter(), self._cpu()
        return self

    def __exit__(self, *exc) -> None:
        self.wall_s, self.cpu_s = time.perf_counter() - self._wall0, self._cpu() - self._cpu0


async def tokenize_grpc(stub, docs: list[str], concurrency: int) -> int:
    queue = list(reversed(docs))
    total = 0

    async def worker():
        nonlocal total
        while queue:
            reply = await stub.Tokenize(tokenizer_pb2.TokenizeRequest(text=queue.pop()))
            total += len(reply.token_ids)
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total


async def stream_grpc(stub, sequences: list[list[int]], batch: int) -> int:
    async def one(ids: list[int]) -> int:
        call = stub.DetokenizeStream()
        await call.write(tokenizer_pb2.DetokenizeStreamRequest(start=tokenizer_pb2.DetokenizeStreamStart(
            prompt_token_ids=ids[:1])))
        for k in range(1, len(ids), batch):
            await call.write(tokenizer_pb2.DetokenizeStreamRequest(tokens=common_pb2.TokenIds(ids=ids[k:k + batch])))
            await call.read()
        await call.write(tokenizer_pb2.DetokenizeStreamRequest(finish=True))
        last = await call.read()
        await call.done_writing()
        return last.num_tokens
    return sum(await asyncio.gather(*(one(ids) for ids in sequences)))


Measured = tuple[float, float, int]  # wall seconds, CPU seconds, tokens


def timed(fn) -> Measured:
    with Meter() as m:
        n = fn()
    return m.wall_s, m.cpu_s, n


def in_process(tok, docs: list[str], sequences: list[list[int]]) -> dict[str, Measured]:
    from tokenizers.decoders import DecodeStream

    fast = tok.text_tokenizer

    def encode_loop():
        return sum(len(fast.encode(d).ids) for d in docs)

    def encode_batch():
        return sum(len(e.ids) for e in fast.encode_batch(docs))

    def session_stream():
        n = 0
        for ids in sequences:
            s = StreamDetokenizer(fast, ids[:1], special_ids=tok.special_ids)
            for t in ids[1:]:
                s.feed([t])
            n += s.finish().num_tokens
        return n

    def decode_stream():
        n = 0
        for ids in sequences:
            stream = DecodeStream(skip_special_tokens=True)
            for t in ids:
                stream.step(fast, t)
            n += len(ids) - 1
        return n

    def one_shot():
        return sum(len(fast.decode(ids)) and len(ids) - 1 for ids in sequences)

    return {"tokenize_encode_loop": timed(encode_loop), "tokenize_encode_batch": timed(encode_batch),
            "stream_session_in_process": timed(session_stream), "stream_tokenizers_decodestream": timed(decode_stream),
            "detokenize_one_shot": timed(one_shot)}


async def grpc_runs(address: str, server_pid: int, docs, sequences, concurrency: int) -> dict[str, Measured]:
    cases = {
        "tokenize_grpc_1_in_flight": lambda stub: tokenize_grpc(stub, docs, 1),
        f"tokenize_grpc_{concurrency}_in_flight": lambda stub: tokenize_grpc(stub, docs, concurrency),
        "stream_grpc_1_id_per_message": lambda stub: stream_grpc(stub, sequences, 1),
        "stream_grpc_16_ids_per_message": lambda stub: stream_grpc(stub, sequences, 16),
    }
    out = {}
    async with create_channel(address) as channel:
        stub = tokenizer_pb2_grpc.TokenizerStub(channel)
        for name, case in cases.items():
            with Meter(server_pid) as m:
                n = await case(stub)
            out[name] = (m.wall_s, m.cpu_s, n)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO.parent / "shared" / "models" / "stories260k"))
    parser.add_argument("--documents", type=int, default=200, help="Tokenize requests per measurement")
    parser.add_argument("--streams", type=int, default=16, help="concurrent DetokenizeStreams")
    parser.add_argument("--concurrency", type=int, default=8, help="Tokenize requests in flight")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the JSON results here")
    args = parser.parse_args()

    load_at_start = round(os.getloadavg()[0], 2)  # other work on the machine skews every number
    tok = load_tokenizer(args.model)
    docs = make_documents(args.model, args.documents)
    sequences = [tok.text_tokenizer.encode(d).ids for d in docs[:args.streams]]
    log = pathlib.Path(tempfile.mkdtemp(prefix="bench-tokenizer-")) / "tokenizer.log"
    server = ServiceProcess("tokenizer", "tokenizer", ["--model", args.model, "--log-level", "WARNING"],
                            log_path=str(log), die_with_parent=True).start()
    runs: dict[str, list[Measured]] = {}
    try:
        server.wait_healthy(180.0)
        asyncio.run(grpc_runs(server.address, server.pid, docs[:20], sequences[:2], args.concurrency))  # warm-up
        for _ in range(args.repeats):
            measured = {**asyncio.run(grpc_runs(server.address, server.pid, docs, sequences, args.concurrency)),
                        **in_process(tok, docs, sequences)}
            for name, m in measured.items():
                runs.setdefault(name, []).append(m)
    finally:
        server.stop(15.0)
    results = {name: {
        "tokens_per_s_median": round(statistics.median(n / wall for wall, _, n in r)),
        "tokens_per_cpu_s_median": round(statistics.median(n / max(cpu, 1e-9) for _, cpu, n in r)),
        "tokens_per_s_runs": [round(n / wall) for wall, _, n in r],
        "tokens_per_run": r[0][2]} for name, r in runs.items()}
    def ratio(a: str, b: str, key: str) -> float:
        return round(results[a][key] / results[b][key], 3)
    grpc_tok = f"tokenize_grpc_{args.concurrency}_in_flight"
    summary = {  # gRPC as a fraction of the in-process library on the same work, wall and CPU
        f"tokenize_grpc_vs_encode_loop_{unit}": ratio(grpc_tok, "tokenize_encode_loop", key)
        for unit, key in (("wall", "tokens_per_s_median"), ("cpu", "tokens_per_cpu_s_median"))}
    for batch in ("1_id", "16_ids"):
        for unit, key in (("wall", "tokens_per_s_median"), ("cpu", "tokens_per_cpu_s_median")):
            summary[f"stream_grpc_{batch}_vs_session_in_process_{unit}"] = ratio(
                f"stream_grpc_{batch}_per_message", "stream_session_in_process", key)
    report = {"what": "tokenizer tier throughput: loopback gRPC vs the tokenizers library in-process",
              **bench_router.environment(), "load_average_1m_at_start": load_at_start,
              "model": pathlib.Path(args.model).name,
              "workload": {"documents": len(docs), "mean_chars": round(statistics.mean(map(len, docs))),
                           "streams": len(sequences), "mean_stream_tokens": round(statistics.mean(map(len, sequences))),
                           "tokenize_concurrency": args.concurrency, "repeats": args.repeats},
              "results": results, "summary": summary}
    write_report(report, args.out)


if __name__ == "__main__":
    main()
