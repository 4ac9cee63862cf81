"""The engine loop: one thread owns the model runner and the EngineCore; asyncio talks to it.

    RPC handlers (event loop)                      engine thread (owns all request state)
    ------------------------------                 --------------------------------------
    add(req) -> asyncio.Queue   --- commands --->  drain commands (add / abort / stop)
    abort(id)                      (SimpleQueue)   core.step(): schedule, model, sample, stop
    queue.get() <- outputs  <-- one call_soon_threadsafe per step: (outputs, load snapshot)

- The event loop is never blocked by a model step: steps run on the engine thread, and the only
  thing crossing back is one callback per step carrying that step's outputs and a load snapshot.
- The engine thread never waits on the network: commands are a non-blocking queue, outputs go to
  unbounded per-request asyncio queues (or a GenerateStream's session, which takes the outputs of
  all its requests); a slow client only grows its own queue.
- The thread also builds the model runner (load, KV sizing, compile), so the CUDA context and every
  tensor live on the thread that uses them; GetStatus reads the phase meanwhile.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import queue
import threading
from collections.abc import Callable
from typing import Protocol

from engine_svc.config import EngineConfig
from engine_svc.core.engine_core import EngineCore, LoadSnapshot
from engine_svc.core.hooks import EngineHooks
from engine_svc.core.request import ErrorKind, FinishReason, Request, RequestOutput
from engine_svc.status import EngineStatusTracker, Phase
from engine_svc.step import ModelInfo
from engine_svc.watchdog import StepHeartbeat, is_fatal_device_error

log = logging.getLogger(__name__)

RECENT_FINISHED_LIMIT = 10_000  # finished ids remembered for Abort's ALREADY_FINISHED


class OutputSink(Protocol):
    """Where a request's outputs go, on the event loop, in order (an asyncio.Queue is one)."""

    def put_nowait(self, output: RequestOutput) -> None: ...


class DuplicateRequest(Exception):
    """A live request already has this id."""


class AbortResult(enum.Enum):
    ABORTED = "aborted"
    ALREADY_FINISHED = "already_finished"
    NOT_FOUND = "not_found"


def build_engine_core(config: EngineConfig, status: EngineStatusTracker | None = None,
                      hooks: EngineHooks | None = None,
                      runner_factory: Callable | None = None) -> tuple[EngineCore, ModelInfo]:
    """Load the model, size and allocate the KV cache, compile; return an EngineCore driving it.

    Advances `status` through LOADING_WEIGHTS, ALLOCATING_KV and COMPILING. Runs on the thread that
    will drive the core (the engine loop's; a benchmark's or a test's own).
    """
    if runner_factory is None:
        from engine_svc.model_runner import ModelRunner  # torch only on this path
        runner_factory = ModelRunner
    status = status or EngineStatusTracker()
    runner = runner_factory(config)
    info = runner.load_model(on_progress=status.progress)
    status.enter(Phase.ENGINE_PHASE_ALLOCATING_KV, "profiling and sizing the KV cache")
    num_blocks = runner.determine_num_blocks()
    runner.allocate_kv_cache(num_blocks)
    status.enter(Phase.ENGINE_PHASE_COMPILING, "compiling kernels" +
                 ("" if config.enforce_eager or config.device == "cpu" else ", capturing CUDA graphs"))
    runner.warmup()
    max_model_len = min(config.max_model_len or info.model_max_len, info.model_max_len)
    core = EngineCore(
        runner, num_blocks=num_blocks, block_size=config.block_size, eos_token_ids=info.eos_token_ids,
        max_model_len=max_model_len, max_num_batched_tokens=config.max_num_batched_tokens,
        max_num_seqs=config.max_num_seqs, enable_chunked_prefill=config.enable_chunked_prefill, hooks=hooks,
        enable_prefix_caching=config.enable_prefix_caching, async_scheduling=config.overlap)
    return core, info


class EngineLoop:
    """Runs the engine on a dedicated thread. Create, ``await start()``, use, ``await stop()``.

    Args:
        config: the validated engine configuration.
        status: phase tracker the thread advances while it builds the runner.
        hooks: tracing/metrics hook points handed to the EngineCore.
        runner_factory: builds the model runner (default engine_svc.model_runner.ModelRunner).
    """

    def __init__(self, config: EngineConfig, status: EngineStatusTracker | None = None,
                 hooks: EngineHooks | None = None, runner_factory: Callable | None = None):
        self.config = config
        self.status = status or EngineStatusTracker()
        self.hooks = hooks
        self._runner_factory = runner_factory
        self.info: ModelInfo | None = None
        self.num_blocks = 0
        self.max_model_len = 0
        self.load: LoadSnapshot | None = None  # latest snapshot (event loop side)
        # KV events (engine_svc/kv_events.py): the block manager appends, the event loop pops.
        self.kv_events: collections.deque | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._outputs: dict[str, OutputSink] = {}  # live requests (event loop side)
        self._recent: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started: asyncio.Future | None = None
        self._load_changed: asyncio.Event | None = None
        self._stopped = False
        self.heartbeat = StepHeartbeat()  # the watchdog's view of step progress
        self.on_fatal: Callable[[str], None] | None = None  # told (event loop side) when the engine cannot go on

    # ---- lifecycle (event loop side) ----

    async def start(self) -> None:
        """Start the thread and wait until the runner is loaded, sized and compiled.

        Raises whatever building the runner raised (ConfigError, a weights error, ...).
        """
        self._loop = asyncio.get_running_loop()
        self._started = self._loop.create_future()
        self._load_changed = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name="kvmesh-engine-loop", daemon=True)
        self._thread.start()
        await self._started

    async def stop(self, timeout_s: float | None = None) -> None:
        """Abort what is still live (CANCELLED), stop the thread and wait for it (at most timeout_s:
        a hung thread is a daemon and dies with the process)."""
        if self._thread is None or self._stopped:
            return
        self._stopped = True
        self._commands.put(("stop",))
        await asyncio.to_thread(self._thread.join, timeout_s)

    # ---- requests (event loop side) ----

    @property
    def thread_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_live(self) -> int:
        return len(self._outputs)

    def is_live(self, request_id: str) -> bool:
        return request_id in self._outputs

    def add(self, req: Request, sink: OutputSink | None = None) -> OutputSink:
        """Submit a validated request; returns where its outputs arrive (the last is finished): `sink`,
        or a new asyncio.Queue. A sink may take the outputs of many requests (a GenerateStream's).

        Raises:
            DuplicateRequest: a live request has the same id.
        """
        if req.request_id in self._outputs:
            raise DuplicateRequest(req.request_id)
        out = sink if sink is not None else asyncio.Queue()
        self._outputs[req.request_id] = out
        self._recent.pop(req.request_id, None)
        self._commands.put(("add", req))
        return out

    def abort(self, request_id: str, reason: FinishReason = FinishReason.CANCELLED,
              error: str | None = None, error_kind: ErrorKind | None = None) -> AbortResult:
        """Abort at the next step boundary (its blocks are freed there). Idempotent.

        A request that finishes on its own in the same step reports ABORTED here and finishes normally.
        """
        if request_id in self._outputs:
            self._commands.put(("abort", request_id, reason, error, error_kind))
            return AbortResult.ABORTED
        if request_id in self._recent:
            return AbortResult.ALREADY_FINISHED
        return AbortResult.NOT_FOUND

    def abort_all(self, reason: FinishReason, error: str | None = None,
                  error_kind: ErrorKind | None = None) -> None:
        for request_id in list(self._outputs):
            self.abort(request_id, reason, error, error_kind)

    def fail(self, reason: str) -> None:
        """The engine cannot go on (event loop side): end every live request with ENGINE_FAILED now,
        without the engine thread (it may be dead or hung), and tell `on_fatal`."""
        outputs = [RequestOutput(rid, [], 0, finished=True, finish_reason=FinishReason.ERROR, error=reason,
                                 error_kind=ErrorKind.ENGINE_FAILED) for rid in self._outputs]
        if self.load is not None:
            self._deliver(outputs, self.load)
        if self.on_fatal is not None:
            self.on_fatal(reason)

    async def wait_load_change(self, timeout: float | None) -> None:
        """Wait until the next load snapshot arrives (or timeout seconds pass)."""
        event = self._load_changed
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is live; False if timeout seconds passed first."""
        deadline = self._loop.time() + timeout
        while self._outputs:
            left = deadline - self._loop.time()
            if left <= 0:
                return False
            await self.wait_load_change(left)
        return True

    def republish(self) -> None:
        """Wake load watchers without a new snapshot (e.g. the draining flag changed)."""
        if self.load is not None:
            self._deliver([], self.load)

    def _deliver(self, outputs: list[RequestOutput], load: LoadSnapshot) -> None:
        """Runs on the event loop, once per step: route outputs, publish the load snapshot."""
        for out in outputs:
            q = self._outputs.get(out.request_id)
            if q is not None:
                q.put_nowait(out)
            if out.finished:
                self._outputs.pop(out.request_id, None)
                self._recent[out.request_id] = None
                if len(self._recent) > RECENT_FINISHED_LIMIT:
                    self._recent.popitem(last=False)
        self.load = load
        changed, self._load_changed = self._load_changed, asyncio.Event()
        changed.set()

    def _started_result(self, exc: BaseException | None) -> None:
        if self._started.done():
            return
        if exc is None:
            self._started.set_result(None)
        else:
            self._started.set_exception(exc)

    # ---- the engine thread ----

    def _post(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _build(self) -> EngineCore:
        core, info = build_engine_core(self.config, self.status, self.hooks, self._runner_factory)
        self.info, self.num_blocks, self.max_model_len = info, core.block_manager.num_blocks, core.max_model_len
        if self.config.enable_prefix_caching:
            self.kv_events = core.block_manager.enable_events()
        return core

    def _run(self) -> None:
        try:
            core = self._build()
        except BaseException as exc:  # noqa: BLE001 - handed to start()'s caller
            log.exception("engine startup failed")
            self._post(self._started_result, exc)
            return
        self._post(self._deliver, [], core.load())
        self._post(self._started_result, None)
        while True:
            outputs: list[RequestOutput] = []
            if not self._drain_commands(core, outputs, block=not core.has_work):
                break
            if core.has_work:
                try:
                    outputs.extend(self.heartbeat.run(core.step))
                except Exception as exc:  # noqa: BLE001 - fail the batch, keep serving (unless fatal)
                    if is_fatal_device_error(exc):
                        self._fail_fatally(core, exc)
                        return
                    log.exception("engine step failed; aborting every live request")
                    outputs.extend(core.abort_all(FinishReason.ERROR, "internal error in the engine step",
                                                  ErrorKind.INTERNAL))
            self._post(self._deliver, outputs, core.load())
        self._post(self._deliver, core.abort_all(FinishReason.CANCELLED), core.load())

    def _fail_fatally(self, core: EngineCore, exc: Exception) -> None:
        """A fatal device error: end every request (usage intact) with ENGINE_FAILED; the process exits."""
        log.critical("fatal device error in an engine step: %s", exc, exc_info=exc)
        reason = f"the engine hit a fatal device error and exits: {type(exc).__name__}: {exc}"
        self._post(self._deliver, core.abort_all(FinishReason.ERROR, reason, ErrorKind.ENGINE_FAILED), core.load())
        self._post(self.fail, reason)

    def _drain_commands(self, core: EngineCore, outputs: list[RequestOutput], block: bool) -> bool:
        """Apply every queued command (waiting for one when idle). False once told to stop."""
        while True:
            try:
                cmd = self._commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            if cmd[0] == "add":
                core.add(cmd[1])
            elif cmd[0] == "abort":
                out = core.abort(*cmd[1:])
                if out is not None:
                    outputs.append(out)
            else:
                return False
