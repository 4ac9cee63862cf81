"""`router --workers 2`: two router processes on one port (SO_REUSEPORT), real processes on loopback.

Both workers take connections and serve them (each client channel here is its own TCP connection;
/proc shows which worker holds it), identical greedy requests get identical text whichever worker
serves them, the engines' blocks are back at baseline after cancels and deadlines, one /metrics sums
the workers, a worker binds only once it can answer, the port is still guarded against a second
server, a killed worker fails the router loudly, and one SIGTERM to the parent drains and stops all.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import time
import urllib.request

import grpc
import pytest

from kvmesh.procs import ServiceProcess, stop_all
from kvmesh.v1 import router_pb2, router_pb2_grpc
from tests.ports import free_port
from tests.router.client import Result, engines_idle, generate, greedy
from tests.router.conftest import CHILD_ENV

ENGINES = ["a", "b"]
NUM_CHANNELS = 16  # all on one worker by chance: 2 ** -15


def children(pid: int) -> list[int]:
    """Pids whose parent is `pid` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rpartition(")")[2].split()[1])
            except (OSError, ValueError):
                continue
            if ppid == pid:
                found.append(int(entry))
    return sorted(found)


def established_on(port: int, pid: int) -> int:
    """TCP connections accepted on local `port` whose socket is open in process `pid`."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[1].rpartition(":")[2], 16) == port and fields[3] == "01":  # 01 = ESTABLISHED
                    inodes.add(fields[9])
    held = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        held += link.startswith("socket:[") and link[8:-1] in inodes
    return held


def own_channel(address: str) -> grpc.aio.Channel:
    """A channel with its own TCP connection (grpc shares subchannels of equal channels otherwise)."""
    return grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def metrics_port():
    return free_port()


@pytest.fixture(scope="module")
def router(mesh, metrics_port):
    return mesh.router(ENGINES, "--workers", "2", "--metrics-port", str(metrics_port))


def _picks(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(v) for v in re.findall(r"^kvmesh:router_picks_total\{[^}]*\} (\S+)$", text, re.M))


async def _cancel_after_first(stub) -> grpc.StatusCode:
    # 7 blocks each: 16 of them fit the two engines' 144 blocks at once, whichever worker admits them
    call = stub.Generate(router_pb2.RouterGenerateRequest(text="Once upon a time", sampling=greedy(100, ignore_eos=True)))
    async for _ in call:
        call.cancel()
        break
    return grpc.StatusCode.CANCELLED if call.cancelled() else (await call.code())


async def test_both_workers_serve_and_blocks_return_after_cancels_and_deadlines(mesh, router, metrics_port):
    workers = children(router.pid)
    assert len(workers) == 2, f"expected 2 workers under {router.pid}, found {workers}"
    channels = [own_channel(router.address) for _ in range(NUM_CHANNELS)]
    try:
        stubs = [router_pb2_grpc.RouterStub(ch) for ch in channels]
        req = router_pb2.RouterGenerateRequest(text="Once upon a time", sampling=greedy(12))
        done: list[Result] = await asyncio.gather(*(generate(s, req) for s in stubs))
        assert all(r.status == grpc.StatusCode.OK for r in done), [(r.status, r.details) for r in done]
        assert len({r.text for r in done}) == 1 and done[0].text  # one greedy answer, whichever worker
        held = {pid: established_on(router.port, pid) for pid in workers}
        assert sum(held.values()) == NUM_CHANNELS and all(held.values()), held  # both workers took connections

        cancelled = await asyncio.gather(*(_cancel_after_first(s) for s in stubs))
        assert set(cancelled) == {grpc.StatusCode.CANCELLED}
        long = router_pb2.RouterGenerateRequest(text="Once upon a time", sampling=greedy(400, ignore_eos=True))
        # 16 x 26 blocks is beyond the two engines' 144 + queueing: the rest are turned away (a failure too)
        ended = await asyncio.gather(*(generate(s, long, timeout=0.3) for s in stubs))
        statuses = {r.status for r in ended}
        assert grpc.StatusCode.DEADLINE_EXCEEDED in statuses, [r.details for r in ended]
        assert statuses <= {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}, statuses
    finally:
        for ch in channels:
            await ch.close()
    loads = await engines_idle([mesh.engines[n].address for n in ENGINES])
    for address, load in loads.items():
        assert load.free_blocks + load.cached_blocks == load.total_blocks and load.num_running_requests == 0, \
            (address, load)
    # One /metrics for both workers: every completed and every cancelled request was dispatched once.
    assert 2 * NUM_CHANNELS <= _picks(metrics_port) <= 3 * NUM_CHANNELS


async def test_port_stays_guarded(mesh, router):
    # another worker group, a single router and a plain socket: none may share the workers' port
    clash = mesh.router(ENGINES, "--workers", "2", "--port", str(router.port), wait=False)
    assert clash.proc.wait(30) == 2
    assert "another server holds it" in open(clash.log_path).read()
    single = mesh.router(ENGINES, "--port", str(router.port), wait=False)
    assert single.proc.wait(60) != 0
    with socket.socket() as s, pytest.raises(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", router.port))


async def test_workers_listen_only_once_they_can_answer(mesh):
    port = free_port()
    targets_down = "127.0.0.1:1"  # no engine: the workers can never answer
    proc = ServiceProcess("router", "router-no-engine", ["--tokenizer", mesh.tokenizer.address, "--engines", targets_down,
                                                         "--workers", "2"],
                          env=CHILD_ENV, log_path=str(mesh.log_dir / "router-no-engine.log"), die_with_parent=True,
                          listen_port=port)
    mesh.routers.append(proc.start())
    await asyncio.sleep(3.0)
    assert proc.proc.poll() is None and proc.poll_port() is None  # no port file: not ready
    assert len(children(proc.pid)) == 2
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", port))  # reserved, but nobody listens
    started = time.monotonic()
    assert proc.stop(timeout_s=20) == 0  # workers still starting stop at once
    assert time.monotonic() - started < 10


async def test_a_killed_worker_fails_the_router_loudly(mesh):
    proc = mesh.router(ENGINES, "--workers", "2")
    workers = children(proc.pid)
    os.kill(workers[0], signal.SIGKILL)
    assert proc.proc.wait(30) == 1
    assert not any(alive(w) for w in workers)
    assert re.search(r"worker-\d exited with code -9", open(proc.log_path).read())


async def test_one_sigterm_drains_and_stops_every_worker(mesh, router):
    workers = children(router.pid)
    channel = own_channel(router.address)
    try:
        stream = asyncio.ensure_future(generate(router_pb2_grpc.RouterStub(channel), router_pb2.RouterGenerateRequest(
            text="Once upon a time", sampling=greedy(200, ignore_eos=True))))
        await asyncio.sleep(0.3)
        assert not stream.done()
        os.kill(router.pid, signal.SIGTERM)
        result = await stream  # in flight when the drain began: finishes within the grace
        assert result.status == grpc.StatusCode.OK and result.last.usage.completion_tokens == 200
    finally:
        await channel.close()
    assert await asyncio.to_thread(router.proc.wait, 30) == 0
    assert not any(alive(w) for w in workers)
    stop_all([router])
