"""Span, event and attribute names used by every kvmesh service, in one place (vLLM `tracing.py`).

The `gen_ai.*` names follow the OpenTelemetry GenAI semantic conventions; `error.type` and the
`rpc.*` names follow the general and gRPC conventions; `kvmesh.*` names are our own. Services import
these constants instead of writing strings, so a dashboard query and the code agree by construction.
"""

from __future__ import annotations

# --- GenAI semantic conventions (request span attributes) ---
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"  # "text_completion" or "chat"
GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"  # always PROVIDER below
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_REQUEST_TOP_P = "gen_ai.request.top_p"
GEN_AI_REQUEST_TOP_K = "gen_ai.request.top_k"
GEN_AI_REQUEST_SEED = "gen_ai.request.seed"
GEN_AI_REQUEST_STOP_SEQUENCES = "gen_ai.request.stop_sequences"
GEN_AI_RESPONSE_ID = "gen_ai.response.id"  # the request id
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"  # tuple of FINISH_* values below
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"

OPERATION_TEXT_COMPLETION = "text_completion"
OPERATION_CHAT = "chat"
PROVIDER = "kvmesh"

# gen_ai.response.finish_reasons values: kvmesh.v1.FinishReason without its prefix, lower case.
FINISH_REASON_NAMES = {
    1: "stop_token",
    2: "stop_string",
    3: "length",
    4: "cancelled",
    5: "error",
}

# --- general conventions ---
ERROR_TYPE = "error.type"  # the gRPC status code name, e.g. "INVALID_ARGUMENT"
RPC_GRPC_STATUS_CODE = "rpc.grpc.status_code"
# HTTP conventions (the router's OpenAI-compatible HTTP front: its SERVER span)
HTTP_REQUEST_METHOD = "http.request.method"
HTTP_ROUTE = "http.route"
HTTP_RESPONSE_STATUS_CODE = "http.response.status_code"
ENDUSER_ID = "enduser.id"  # the OpenAI request's `user`

# --- kvmesh request attributes ---
REQUEST_ID = "kvmesh.request.id"
REQUEST_PRIORITY = "kvmesh.request.priority"
ENGINE_ID = "kvmesh.engine.id"  # on the router span: the engine that served; on engine spans: itself
NUM_CACHED_PROMPT_TOKENS = "kvmesh.usage.cached_prompt_tokens"
NUM_PREEMPTIONS = "kvmesh.request.num_preemptions"

# --- engine request span (a child of the Generate RPC's span) and its events (STYLE.md point 13: request spans carry events, steps get spans) ---
REQUEST_SPAN_NAME = "kvmesh.engine.request"
EVENT_QUEUED = "kvmesh.queued"  # admitted into the waiting queue
EVENT_SCHEDULED = "kvmesh.scheduled"  # first (or, after preemption, renewed) scheduling
EVENT_PREFILL_CHUNK = "kvmesh.prefill_chunk"  # one chunk of prompt tokens computed
EVENT_FIRST_TOKEN = "kvmesh.first_token"
EVENT_PREEMPTED = "kvmesh.preempted"
EVENT_ABORTED = "kvmesh.aborted"
EVENT_FINISHED = "kvmesh.finished"

# Event attributes.
CHUNK_START = "kvmesh.chunk.start"  # position of the chunk's first token
CHUNK_TOKENS = "kvmesh.chunk.num_tokens"
STEP_INDEX = "kvmesh.step.index"  # on scheduled / prefill_chunk / first_token events: which step
ABORT_REASON = "kvmesh.abort.reason"  # "cancelled", "deadline_exceeded", "abort_rpc", "draining", ...
FINISH_REASON = "kvmesh.finish.reason"  # on the finished event: a FINISH_REASON_NAMES value

# --- engine step spans (each linked to the request spans its steps served; STEP_INDEX: the first) ---
STEP_SPAN_NAME = "kvmesh.engine.step"
STEP_COUNT = "kvmesh.step.count"  # consecutive steps the span covers (decode runs share one span)
STEP_NUM_REQUESTS = "kvmesh.step.num_requests"
STEP_NUM_PREFILL_TOKENS = "kvmesh.step.num_prefill_tokens"
STEP_NUM_DECODE_TOKENS = "kvmesh.step.num_decode_tokens"

# --- router: the routing-decision event on the router's request span (router.policy.Decision) ---
EVENT_ROUTE_DECISION = "kvmesh.route"
ROUTE_REQUEST_ID = "kvmesh.route.request_id"
ROUTE_POLICY = "kvmesh.route.policy"
ROUTE_ATTEMPT = "kvmesh.route.attempt"  # 0 for the first choice, 1.. for failovers
ROUTE_CHOSEN = "kvmesh.route.chosen"  # address of the engine picked ("" when none could admit)
ROUTE_REASON = "kvmesh.route.reason"
ROUTE_PROMPT_TOKENS = "kvmesh.route.prompt_tokens"
ROUTE_MAX_TOKENS = "kvmesh.route.max_tokens"
ROUTE_EXCLUDED = "kvmesh.route.excluded"
# Per-candidate arrays, aligned with ROUTE_CANDIDATES:
ROUTE_CANDIDATES = "kvmesh.route.candidates"  # addresses
ROUTE_ENGINE_IDS = "kvmesh.route.engine_ids"
ROUTE_FREE_BLOCKS = "kvmesh.route.free_blocks"
ROUTE_CACHED_BLOCKS = "kvmesh.route.cached_blocks"
ROUTE_ENGINE_RESERVED_BLOCKS = "kvmesh.route.engine_reserved_blocks"
ROUTE_WAITING_TOKENS = "kvmesh.route.waiting_tokens"
ROUTE_PENDING_BLOCKS = "kvmesh.route.pending_blocks"
ROUTE_IN_FLIGHT = "kvmesh.route.in_flight"
ROUTE_REPORT_AGES = "kvmesh.route.report_age_s"
ROUTE_NEED_BLOCKS = "kvmesh.route.need_blocks"
ROUTE_SCORES = "kvmesh.route.scores"
ROUTE_TIERS = "kvmesh.route.tiers"

# --- tokenizer ---
TOKENIZER_NUM_TOKENS = "kvmesh.tokenizer.num_tokens"
