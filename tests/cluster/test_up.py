"""The README's main job, `bash scripts/up.sh`, run as a user runs it: real processes on loopback.

Each test starts the launcher in a subprocess, reads what it prints, and checks afterwards that
every child it started (pids.json in the run directory) has exited, left no process group behind,
and freed its port.
"""

from __future__ import annotations

import json
import os
import pathlib
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import httpx
import pytest

from kvmesh.v1 import engine_pb2, engine_pb2_grpc

REPO = pathlib.Path(__file__).resolve().parents[2]
KVMESH = pathlib.Path(sys.executable).parent / "kvmesh"
STARTUP_S = 150  # two cores, four Python processes importing torch/transformers at once

pytestmark = pytest.mark.slow


class Launcher:
    """A launcher subprocess whose output lines are collected by a thread."""

    def __init__(self, cmd: list[str]):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KVMESH_", "OTEL_"))}
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout_s: float) -> re.Match:
        """The first line (seen so far or arriving) matching `pattern`; fail with the output so far."""
        for line in self.lines:
            if m := re.search(pattern, line):
                return m
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
            if m := re.search(pattern, line):
                return m
        self.kill()
        pytest.fail(f"no line matching {pattern!r} within {timeout_s:.0f}s; output:\n" + self.output)

    def finish(self, timeout_s: float) -> int:
        rc = self.proc.wait(timeout_s)
        while (line := self._queue.get(timeout=5)) is not None:
            self.lines.append(line)
        return rc

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)


def _children(launcher: Launcher) -> list[dict]:
    run_dir = launcher.wait_for(r"run directory (\S+)", 30).group(1)
    with open(os.path.join(run_dir, "pids.json")) as f:
        return json.load(f)["services"]


def _live_processes() -> dict[int, int]:
    """pid -> process group of every process that is not a zombie (from /proc)."""
    live = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, _ppid, pgrp = f.read().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError):
            continue  # exited while we looked
        if state != "Z":
            live[int(entry)] = int(pgrp)
    return live


def _left_running(children: list[dict]) -> list[str]:
    """Children still running, or whose process group (each child leads its own) still has members."""
    live = _live_processes()
    groups = set(live.values())
    return [c["name"] for c in children if c["pid"] in live or c["pid"] in groups]


def _port_free(port: int) -> bool:
    with socket.socket() as s:  # nothing accepts connections...
        if s.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket() as s:  # ...and the port can be bound again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _assert_all_gone(children: list[dict], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (left := _left_running(children)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"still running: {left}"
    busy = [f"{c['name']}:{c['port']}" for c in children if c["port"] and not _port_free(c["port"])]
    assert not busy, f"ports still in use: {busy}"


@pytest.fixture()
def launch():
    """Start launchers; at teardown kill any launcher and child a failed test left behind."""
    started: list[Launcher] = []

    def start(cmd: list[str]) -> Launcher:
        started.append(Launcher(cmd))
        return started[-1]

    yield start
    for launcher in started:
        launcher.kill()
        for line in launcher.lines:
            if m := re.search(r"run directory (\S+)", line):
                try:
                    with open(os.path.join(m.group(1), "pids.json")) as f:
                        pgids = [c["pid"] for c in json.load(f)["services"]]
                except OSError:
                    pgids = []
                for pgid in pgids:
                    try:
                        os.killpg(pgid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass


def test_readme_command_answers_then_ctrl_c_stops_everything(launch):
    launcher = launch(["bash", "scripts/up.sh"])  # exactly the README's main-job command
    launcher.wait_for(r"cluster is up: .*; Ctrl-C to stop", STARTUP_S)
    children = _children(launcher)
    assert sorted(c["kind"] for c in children) == ["engine", "engine", "router", "tokenizer"]
    live = _live_processes()
    assert all(c["port"] and c["pid"] in live for c in children), children
    address = launcher.wait_for(r"router listening on (127\.0\.0\.1:\d+)", 1).group(1)
    assert address == f"127.0.0.1:{[c for c in children if c['kind'] == 'router'][0]['port']}"
    # The router is on 50051, `kvmesh generate`'s default: the command printed next works as it is.
    assert address == "127.0.0.1:50051"
    launcher.wait_for(r"try: \S*kvmesh generate --prompt", 1)
    generated = subprocess.run([str(KVMESH), "generate", "--prompt", "Hi", "--max-tokens", "4"], capture_output=True,
                               text=True, timeout=60)
    assert generated.returncode == 0 and generated.stdout.strip(), generated.stderr
    # Engine startup phases were shown, and the sample came through the router, labelled as noise.
    launcher.wait_for(r"engine-1\s+READY", 1)
    launcher.wait_for(r"demo model: its weights are random", 1)
    out = launcher.output
    sample = out.split("prompt: 'The capital of France is'\n", 1)[1].split("\nsample generation done", 1)[0]
    assert sample.strip(), f"empty sample generation:\n{out}"

    launcher.proc.send_signal(signal.SIGINT)
    rc = launcher.finish(60)
    assert rc == 0, launcher.output
    _assert_all_gone(children)
    # Every child drained and exited by itself (exit 0), none was killed.
    stopped = launcher.wait_for(r"^stopped: (.*)", 1).group(1)
    codes = dict(re.findall(r"([\w-]+) \(exit (-?\d+)\)", stopped))
    assert codes == {c["name"]: "0" for c in children}, stopped


def test_a_child_that_fails_to_start_stops_the_rest(launch, tmp_path):
    """A checkpoint the services cannot load: the launcher names the failure and cleans up."""
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["NoSuchModel"], "model_type": "nope"}))
    launcher = launch([str(KVMESH), "up", "--port", "0", "--once", "--model", str(tmp_path), "--run-dir", str(tmp_path / "run")])
    rc = launcher.finish(STARTUP_S)
    assert rc == 1, launcher.output
    assert re.search(r"(tokenizer|engine-\d) exited with code", launcher.output), launcher.output
    assert "--- last lines of" in launcher.output
    _assert_all_gone(_children(launcher))


def test_killed_launcher_leaves_no_orphans(launch, tmp_path):
    """SIGKILL gives the launcher no chance to clean up: the children stop by themselves, the router's
    workers (--router-workers 2) with it."""
    launcher = launch([str(KVMESH), "up", "--port", "0", "--http-port", "0", "--num-engines", "1", "--max-tokens", "4",
                       "--router-workers", "2", "--run-dir", str(tmp_path)])
    launcher.wait_for(r"cluster is up: .*; Ctrl-C to stop", STARTUP_S)
    children = _children(launcher)
    assert "2 workers serving on" in (tmp_path / "router.log").read_text()
    # The OpenAI-compatible API that --http-port adds answers what the printed curl line asks.
    url = launcher.wait_for(r"OpenAI-compatible API on (http://127\.0\.0\.1:\d+)/v1", 1).group(1)
    reply = httpx.post(f"{url}/v1/completions", json={"prompt": "Hello", "max_tokens": 3}, timeout=60)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3, reply.text
    os.kill(launcher.proc.pid, signal.SIGKILL)
    launcher.finish(10)
    _assert_all_gone(children, timeout_s=30)


def test_a_real_checkpoint_answers_like_the_reference(launch, stories260k_dir, tmp_path):
    """`--model DIR --once` end to end: the greedy sample matches llama2.c's reference continuation,
    and the launcher exits by itself, leaving nothing behind."""
    with open(stories260k_dir / "greedy_examples.json") as f:
        example = json.load(f)["examples"][0]
    launcher = launch([str(KVMESH), "up", "--port", "0", "--once", "--model", str(stories260k_dir), "--num-engines", "1",
                       "--prompt", example["prompt"], "--max-tokens", "16", "--run-dir", str(tmp_path)])
    rc = launcher.finish(STARTUP_S)
    assert rc == 0, launcher.output
    children = _children(launcher)
    assert sorted(c["kind"] for c in children) == ["engine", "router", "tokenizer"]
    assert "demo model" not in launcher.output  # only the demo is labelled as noise
    sample = launcher.output.split(f"prompt: {example['prompt']!r}\n", 1)[1].split("\nsample generation done")[0]
    expected = example["expected_text"].removeprefix(example["prompt"])
    assert len(sample) > 20 and expected.startswith(sample), f"{sample!r} vs {expected!r}"
    _assert_all_gone(children)


def test_the_router_reaches_the_tokenizer_on_its_unix_socket(launch, stories260k_dir, tmp_path):
    """The default: the tokenizer listens on tokenizer.sock in the run directory beside its TCP port, the
    router dials it there; a generation through the router matches the reference and frees its blocks."""
    with open(stories260k_dir / "greedy_examples.json") as f:
        example = json.load(f)["examples"][0]
    launcher = launch([str(KVMESH), "up", "--port", "0", "--model", str(stories260k_dir), "--num-engines", "1",
                       "--max-tokens", "4", "--run-dir", str(tmp_path)])
    launcher.wait_for(r"cluster is up: .*; Ctrl-C to stop", STARTUP_S)
    children = _children(launcher)
    by_kind = {c["kind"]: c for c in children}
    socket_path = tmp_path / "tokenizer.sock"
    assert socket_path.is_socket()
    with open(f"/proc/{by_kind['router']['pid']}/cmdline") as f:
        router_args = f.read().split("\0")
    assert router_args[router_args.index("--tokenizer") + 1] == f"unix:{socket_path}"
    address = launcher.wait_for(r"router listening on (127\.0\.0\.1:\d+)", 1).group(1)
    generated = subprocess.run([str(KVMESH), "generate", "--router", address, "--prompt", example["prompt"],
                                "--max-tokens", "16", "--temperature", "0"], capture_output=True, text=True, timeout=60)
    assert generated.returncode == 0, generated.stderr
    expected = example["expected_text"].removeprefix(example["prompt"])
    text = generated.stdout.strip()
    assert len(text) > 20 and expected.strip().startswith(text), f"{text!r} vs {expected!r}"
    with grpc.insecure_channel(f"127.0.0.1:{by_kind['engine']['port']}") as channel:
        deadline = time.monotonic() + 10
        while (load := engine_pb2_grpc.EngineStub(channel).GetLoad(engine_pb2.GetLoadRequest(), timeout=10)) \
                .in_use_blocks and time.monotonic() < deadline:
            time.sleep(0.1)
    assert load.in_use_blocks == 0 and load.num_running_requests == 0, load
    launcher.proc.send_signal(signal.SIGINT)
    assert launcher.finish(60) == 0, launcher.output
    _assert_all_gone(children)


def test_a_child_dying_while_up_stops_the_cluster(launch, tmp_path):
    """An engine lost after startup: the launcher says which one, shows its log, and stops the rest."""
    launcher = launch([str(KVMESH), "up", "--port", "0", "--num-engines", "1", "--max-tokens", "4",
                       "--run-dir", str(tmp_path)])
    launcher.wait_for(r"cluster is up: .*; Ctrl-C to stop", STARTUP_S)
    children = _children(launcher)
    (engine,) = [c for c in children if c["kind"] == "engine"]
    os.kill(engine["pid"], signal.SIGKILL)
    assert launcher.finish(60) == 1, launcher.output
    launcher.wait_for(r"engine-0 exited with code -9", 1)
    launcher.wait_for(r"--- last lines of .*engine-0\.log", 1)
    _assert_all_gone(children)
