"""Prometheus metrics of every kvmesh service, served on `/metrics` (`--metrics-port`).

Names: what vLLM users already chart, under a `kvmesh:` prefix (`kvmesh:num_requests_running`,
`kvmesh:time_to_first_token_seconds`, ...); the OpenTelemetry GenAI server histograms as Prometheus
spells them (`gen_ai.server.request.duration` -> `gen_ai_server_request_duration_seconds`); and KV
block counts for inference gateways. Counters get the `_total` suffix from prometheus-client.

The metric objects live in the process's default registry, created once at import. Services update
them through the small recorder classes below, which bind the label values once, so the step loop
pays one locked add or set per update and formats nothing.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily

# Bucket bounds recommended by the GenAI semantic conventions.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                 0.75, 1.0, 2.5)
_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96,
                     81.92)

_MODEL = ("model_name",)

# --- engine ---
NUM_REQUESTS_RUNNING = Gauge("kvmesh:num_requests_running", "Requests being computed.", _MODEL)
NUM_REQUESTS_WAITING = Gauge("kvmesh:num_requests_waiting",
                             "Requests admitted but not running (preempted ones included).", _MODEL)
KV_CACHE_USAGE_PERC = Gauge("kvmesh:kv_cache_usage_perc",
                            "Fraction of KV blocks referenced by running requests (1 = full).", _MODEL)
KV_BLOCKS_TOTAL = Gauge("kvmesh:kv_blocks_total", "KV blocks in the cache.", _MODEL)
KV_BLOCKS_FREE = Gauge("kvmesh:kv_blocks_free", "KV blocks on the free list.", _MODEL)
KV_BLOCKS_CACHED = Gauge("kvmesh:kv_blocks_cached",
                         "KV blocks holding evictable cached prefixes, referenced by no request.", _MODEL)
KV_BLOCKS_IN_USE = Gauge("kvmesh:kv_blocks_in_use", "KV blocks referenced by running requests.", _MODEL)
KV_BLOCKS_RESERVED = Gauge("kvmesh:kv_blocks_reserved",
                           "KV blocks running requests still need to reach max_tokens.", _MODEL)
TIME_TO_FIRST_TOKEN = Histogram("kvmesh:time_to_first_token_seconds",
                                "Engine arrival to first generated token.", _MODEL, buckets=_TTFT_BUCKETS)
INTER_TOKEN_LATENCY = Histogram("kvmesh:inter_token_latency_seconds",
                                "Time between two consecutive generated tokens of a request.", _MODEL,
                                buckets=_TPOT_BUCKETS)
E2E_REQUEST_LATENCY = Histogram("kvmesh:e2e_request_latency_seconds",
                                "Engine arrival to the request's end, whatever the reason.", _MODEL,
                                buckets=_DURATION_BUCKETS)
PROMPT_TOKENS = Counter("kvmesh:prompt_tokens", "Prompt tokens of finished requests.", _MODEL)
GENERATION_TOKENS = Counter("kvmesh:generation_tokens", "Generated tokens.", _MODEL)
NUM_PREEMPTIONS = Counter("kvmesh:num_preemptions", "Requests preempted (by recompute).", _MODEL)
REQUEST_SUCCESS = Counter("kvmesh:request_success", "Requests that finished, by finish reason.",
                          (*_MODEL, "finished_reason"))
REQUEST_ABORTS = Counter("kvmesh:request_aborts", "Requests aborted before finishing, by reason.",
                         (*_MODEL, "reason"))



class _CounterFromLoad:
    """A counter whose value the engine keeps (a cumulative LoadSnapshot field), read at scrape
    time: the step loop pays nothing. One source per model name (the engine process's)."""

    def __init__(self, name: str, documentation: str, field: str):
        self.name, self.documentation, self.field = name, documentation, field
        self._sources: dict[str, object] = {}
        REGISTRY.register(self)

    def watch(self, model_name: str, get_load) -> None:
        self._sources[model_name] = get_load

    def collect(self):
        family = CounterMetricFamily(self.name, self.documentation, labels=_MODEL)
        for model_name, get_load in self._sources.items():
            family.add_metric([model_name], getattr(get_load(), self.field, 0))
        yield family

    def describe(self):
        yield CounterMetricFamily(self.name, self.documentation, labels=_MODEL)


PREFIX_CACHE_QUERIES = _CounterFromLoad(
    "kvmesh:prefix_cache_queries", "Prefix cache queries, in tokens: the tokens of every admitted sequence "
    "that looked the cache up.", "prefix_cache_queries")
PREFIX_CACHE_HITS = _CounterFromLoad(
    "kvmesh:prefix_cache_hits", "Prefix cache hits, in tokens: tokens whose KV was found cached.",
    "prefix_cache_hits")

# --- router ---
ROUTER_PICKS = Counter("kvmesh:router_picks", "Routing decisions, by chosen engine.", ("engine_id",))
# multiprocess_mode: with `router --workers N`, the value the last worker to pick that engine set.
ROUTER_REPORT_AGE = Gauge("kvmesh:router_load_report_age_seconds",
                          "Age of the newest load report from each engine when last used.", ("engine_id",),
                          multiprocess_mode="mostrecent")

# --- GenAI server histograms (the public endpoint: the router) ---
_GEN_AI = ("gen_ai_operation_name", "gen_ai_request_model")
GEN_AI_REQUEST_DURATION = Histogram("gen_ai_server_request_duration_seconds",
                                    "GenAI server request duration, first byte in to last byte out.",
                                    (*_GEN_AI, "error_type"), buckets=_DURATION_BUCKETS)
GEN_AI_TIME_TO_FIRST_TOKEN = Histogram("gen_ai_server_time_to_first_token_seconds",
                                       "Time to generate the first token.", _GEN_AI, buckets=_TTFT_BUCKETS)
GEN_AI_TIME_PER_OUTPUT_TOKEN = Histogram("gen_ai_server_time_per_output_token_seconds",
                                         "Time per output token after the first.", _GEN_AI,
                                         buckets=_TPOT_BUCKETS)

# --- tokenizer ---
TOKENIZER_TOKENS = Counter("kvmesh:tokenizer_tokens", "Token ids produced or consumed, by operation.",
                           ("operation",))


def start_metrics_server(port: int | None, host: str = "127.0.0.1") -> int | None:
    """Serve `/metrics` over HTTP from a daemon thread. Returns the bound port, or None when port is
    None (metrics off). Port 0 picks a free port."""
    if port is None:
        return None
    server, _thread = start_http_server(port, addr=host)
    return server.server_port


class EngineMetrics:
    """The engine's updates, label values bound once. Safe to call from the step thread."""

    __slots__ = ("running", "waiting", "usage", "total", "free", "cached", "in_use", "reserved",
                 "ttft", "itl", "e2e", "prompt_tokens", "generation_tokens", "preemptions", "_model")

    def __init__(self, model_name: str):
        self._model = model_name
        self.running = NUM_REQUESTS_RUNNING.labels(model_name)
        self.waiting = NUM_REQUESTS_WAITING.labels(model_name)
        self.usage = KV_CACHE_USAGE_PERC.labels(model_name)
        self.total = KV_BLOCKS_TOTAL.labels(model_name)
        self.free = KV_BLOCKS_FREE.labels(model_name)
        self.cached = KV_BLOCKS_CACHED.labels(model_name)
        self.in_use = KV_BLOCKS_IN_USE.labels(model_name)
        self.reserved = KV_BLOCKS_RESERVED.labels(model_name)
        self.ttft = TIME_TO_FIRST_TOKEN.labels(model_name)
        self.itl = INTER_TOKEN_LATENCY.labels(model_name)
        self.e2e = E2E_REQUEST_LATENCY.labels(model_name)
        self.prompt_tokens = PROMPT_TOKENS.labels(model_name)
        self.generation_tokens = GENERATION_TOKENS.labels(model_name)
        self.preemptions = NUM_PREEMPTIONS.labels(model_name)

    def update_load(self, report) -> None:
        """Set the queue and block gauges from a kvmesh.v1.LoadReport (or anything with its fields)."""
        self.running.set(report.num_running_requests)
        self.waiting.set(report.num_waiting_requests)
        self.total.set(report.total_blocks)
        self.free.set(report.free_blocks)
        self.cached.set(report.cached_blocks)
        self.in_use.set(report.in_use_blocks)
        self.reserved.set(report.reserved_blocks)
        self.usage.set(report.in_use_blocks / report.total_blocks if report.total_blocks else 0.0)

    def watch_load(self, get_load) -> None:
        """Read the queue and block gauges at scrape time from get_load() (the newest LoadSnapshot or
        LoadReport, or None before the first): the step loop pays nothing for them."""
        def field(name):
            return lambda: getattr(get_load(), name, 0)

        for gauge, name in ((self.running, "num_running_requests"), (self.waiting, "num_waiting_requests"),
                            (self.total, "total_blocks"), (self.free, "free_blocks"),
                            (self.cached, "cached_blocks"), (self.in_use, "in_use_blocks"),
                            (self.reserved, "reserved_blocks")):
            gauge.set_function(field(name))

        for counter in (PREFIX_CACHE_QUERIES, PREFIX_CACHE_HITS):
            counter.watch(self._model, get_load)

        def usage():
            load = get_load()
            return load.in_use_blocks / load.total_blocks if load is not None and load.total_blocks else 0.0
        self.usage.set_function(usage)

    def finished(self, finish_reason: str, num_prompt_tokens: int, e2e_s: float) -> None:
        """A request ended with a finish reason (FINISH_REASON_NAMES value). Aborts go to aborted()."""
        REQUEST_SUCCESS.labels(self._model, finish_reason).inc()
        self.prompt_tokens.inc(num_prompt_tokens)
        self.e2e.observe(e2e_s)

    def aborted(self, reason: str, num_prompt_tokens: int, e2e_s: float) -> None:
        REQUEST_ABORTS.labels(self._model, reason).inc()
        self.prompt_tokens.inc(num_prompt_tokens)
        self.e2e.observe(e2e_s)


class RouterMetrics:
    """The router's updates: picks, report ages and the GenAI server histograms."""

    __slots__ = ("_labels",)

    def __init__(self, operation_name: str, model: str):
        self._labels = (operation_name, model)

    @staticmethod
    def picked(engine_id: str, report_age_s: float) -> None:
        ROUTER_PICKS.labels(engine_id).inc()
        ROUTER_REPORT_AGE.labels(engine_id).set(report_age_s)

    def request_done(self, duration_s: float, error_type: str = "") -> None:
        GEN_AI_REQUEST_DURATION.labels(*self._labels, error_type).observe(duration_s)

    def first_token(self, ttft_s: float) -> None:
        GEN_AI_TIME_TO_FIRST_TOKEN.labels(*self._labels).observe(ttft_s)

    def per_output_token(self, seconds: float) -> None:
        GEN_AI_TIME_PER_OUTPUT_TOKEN.labels(*self._labels).observe(seconds)
