"""Router configuration: one validated value object built from flags / KVMESH_* variables."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from router.discovery import Target, parse_targets
from router.policy import POLICIES


DETOKENIZE_MODES = ("shared", "per_request")
ENGINE_STREAM_MODES = ("auto", "shared", "per_request")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the value and the fix."""


@dataclass
class RouterConfig:
    tokenizer: str  # HOST:PORT (or any gRPC target) of tokenizer_svc
    engines: list[Target]  # static addresses and dns:/// names
    policy: str = "kv"  # kv | cache_aware | round_robin | least_requests
    staleness_bound_s: float = 2.0  # a report older than this is stale
    queue_ratio: float = 1.0  # kv policy: an engine may be asked to queue up to this x its blocks
    cache_weight: float = 1.0  # cache_aware policy: score of a whole-prompt prefix-cache hit
    balance_requests: float = 4.0  # cache_aware policy: requests in flight beyond the least busy engine that cost 1
    dns_refresh_s: float = 5.0  # re-resolve dns:/// targets this often
    heartbeat_ms: int = 500  # WatchLoad heartbeat asked of engines
    min_report_interval_ms: int = 20  # WatchLoad change-driven report rate limit
    default_max_tokens: int = 256  # when the request leaves max_tokens absent (clamped to the model)
    max_tokens_limit: int = 4096  # largest max_tokens accepted
    max_prompt_tokens: int | None = None  # None = the model's max_model_len
    max_stop_strings: int = 16
    max_stop_string_bytes: int = 256
    max_concurrent_streams: int = 1024  # Generate streams open at once; beyond -> RESOURCE_EXHAUSTED
    max_attempts: int = 3  # engines tried for one request before its first token (failover)
    retry_after_s: float = 1.0  # RetryInfo delay when no engine can admit
    auth_token: str | None = None  # bearer token clients must present (None = no auth)
    tls_cert: str | None = None  # PEM server certificate chain (TLS when set with tls_key)
    tls_key: str | None = None
    tls_client_ca: str | None = None  # PEM CA bundle: require client certificates (mTLS)
    http_port: int | None = None  # the OpenAI-compatible HTTP front's port (None = off, 0 = any free port)
    http_host: str | None = None  # where the HTTP front listens (None = the gRPC --host)
    # shared: every request's detokenization on one DetokenizeSessions stream (when the tokenizer
    # offers it and tracing is off: a traced request keeps its own DetokenizeStream and span);
    # per_request: one DetokenizeStream per request.
    detokenize: str = "shared"
    # auto: every request to an engine on one shared GenerateStream per engine (when the engine
    # offers it and tracing is off: a traced request keeps its own Generate call and the engine's
    # span of it); shared: whenever the engine offers it, traced or not (the trace context travels
    # in each request); per_request: one Generate call per request.
    engine_stream: str = "auto"

    def validate(self) -> "RouterConfig":
        if self.policy not in POLICIES:
            raise ConfigError(f"policy={self.policy!r}: use one of {', '.join(POLICIES)}")
        positive = {"staleness_bound_s": self.staleness_bound_s, "dns_refresh_s": self.dns_refresh_s,
                    "heartbeat_ms": self.heartbeat_ms, "default_max_tokens": self.default_max_tokens,
                    "max_tokens_limit": self.max_tokens_limit, "max_stop_strings": self.max_stop_strings,
                    "max_stop_string_bytes": self.max_stop_string_bytes,
                    "max_concurrent_streams": self.max_concurrent_streams, "max_attempts": self.max_attempts,
                    "retry_after_s": self.retry_after_s}
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{name}={value}: must be > 0")
        if self.cache_weight < 0:
            raise ConfigError(f"cache_weight={self.cache_weight}: must be >= 0 (0 = ignore cached prefixes)")
        if self.balance_requests <= 0:
            raise ConfigError(f"balance_requests={self.balance_requests}: must be > 0")
        if self.queue_ratio < 0:
            raise ConfigError(f"queue_ratio={self.queue_ratio}: must be >= 0 (0 = never queue at an engine)")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ConfigError(f"max_prompt_tokens={self.max_prompt_tokens}: must be >= 1")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ConfigError(f"default_max_tokens={self.default_max_tokens} exceeds max_tokens_limit="
                              f"{self.max_tokens_limit}: lower the default or raise the limit")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key go together: pass both or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("tls_client_ca (mTLS) needs tls_cert and tls_key")
        if self.http_port is not None and not (0 <= self.http_port <= 65535):
            raise ConfigError(f"http_port={self.http_port}: use a port in [0, 65535] (0 = any free port)")
        if self.detokenize not in DETOKENIZE_MODES:
            raise ConfigError(f"detokenize={self.detokenize!r}: use one of {', '.join(DETOKENIZE_MODES)}")
        if self.engine_stream not in ENGINE_STREAM_MODES:
            raise ConfigError(f"engine_stream={self.engine_stream!r}: use one of {', '.join(ENGINE_STREAM_MODES)}")
        if self.auth_token is not None and not self.auth_token:
            raise ConfigError("auth_token is empty: pass a token or leave the flag out")
        return self


def add_router_flags(parser: argparse.ArgumentParser) -> None:
    """The router's own flags (beside add_server_flags)."""
    d = RouterConfig.__dataclass_fields__
    parser.add_argument("--tokenizer", required=True, help="tokenizer service HOST:PORT")
    parser.add_argument("--engines", required=True,
                        help="engine replicas: HOST:PORT[,HOST:PORT...] and/or dns:///NAME:PORT")
    parser.add_argument("--policy", default=d["policy"].default, choices=sorted(POLICIES),
                        type=lambda name: name.replace("-", "_"),
                        help="replica choice: kv (free KV blocks), cache_aware (prefix-cache hits and free "
                             "KV blocks, from the engines' KV events), round_robin, least_requests")
    parser.add_argument("--cache-weight", type=float, default=d["cache_weight"].default,
                        help="cache_aware policy: score of a whole-prompt prefix-cache hit (a half hit, half)")
    parser.add_argument("--balance-requests", type=float, default=d["balance_requests"].default,
                        help="cache_aware policy: requests in flight beyond the least busy engine that "
                             "outweigh a whole-prompt hit (at --cache-weight 1)")
    parser.add_argument("--staleness-bound", type=float, default=d["staleness_bound_s"].default,
                        help="seconds after which an engine's load report counts as stale")
    parser.add_argument("--queue-ratio", type=float, default=d["queue_ratio"].default,
                        help="kv policy: let an engine queue work up to this many times its KV blocks")
    parser.add_argument("--dns-refresh", type=float, default=d["dns_refresh_s"].default,
                        help="seconds between re-resolutions of dns:/// engine targets")
    parser.add_argument("--heartbeat-ms", type=int, default=d["heartbeat_ms"].default,
                        help="load-report heartbeat asked of each engine")
    parser.add_argument("--default-max-tokens", type=int, default=d["default_max_tokens"].default,
                        help="max_tokens when a request leaves it out")
    parser.add_argument("--max-tokens-limit", type=int, default=d["max_tokens_limit"].default,
                        help="largest max_tokens a request may ask for")
    parser.add_argument("--max-prompt-tokens", type=int, default=None,
                        help="longest prompt in tokens (default: the model's max_model_len)")
    parser.add_argument("--max-stop-strings", type=int, default=d["max_stop_strings"].default,
                        help="most stop strings in one request")
    parser.add_argument("--max-stop-string-bytes", type=int, default=d["max_stop_string_bytes"].default,
                        help="longest stop string, in UTF-8 bytes")
    parser.add_argument("--max-concurrent-streams", type=int, default=d["max_concurrent_streams"].default,
                        help="Generate streams open at once; more get RESOURCE_EXHAUSTED")
    parser.add_argument("--max-attempts", type=int, default=d["max_attempts"].default,
                        help="engines tried for a request before its first token")
    parser.add_argument("--retry-after", type=float, default=d["retry_after_s"].default,
                        help="retry delay (seconds) advertised when overloaded")
    parser.add_argument("--auth-token", default=None,
                        help="require 'authorization: Bearer TOKEN' (prefer the env variable)")
    parser.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve TLS")
    parser.add_argument("--tls-key", default=None, help="PEM private key for --tls-cert")
    parser.add_argument("--tls-client-ca", default=None, help="PEM CA bundle: require client certificates")
    parser.add_argument("--http-port", type=int, default=None,
                        help="also serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions,"
                             " /v1/models, /health) on this port; 0 = any free port; off when absent")
    parser.add_argument("--http-host", default=None, help="address the HTTP API listens on (default: --host)")
    parser.add_argument("--detokenize", default=d["detokenize"].default, choices=DETOKENIZE_MODES,
                        type=lambda name: name.replace("-", "_"),
                        help="shared: all requests' detokenization on one stream to the tokenizer (fewest "
                             "messages; used when the tokenizer offers it and tracing is off); per_request: "
                             "one DetokenizeStream per request")
    parser.add_argument("--engine-stream", default=d["engine_stream"].default, choices=ENGINE_STREAM_MODES,
                        type=lambda name: name.replace("-", "_"),
                        help="auto: every request to an engine on one shared GenerateStream (fewest messages; "
                             "used when the engine offers it and tracing is off); shared: also when tracing "
                             "(the trace context travels in each request); per_request: one Generate call per request")
    parser.add_argument("--http-port-file", default=None,
                        help="write the HTTP API's bound port to this file once serving (launchers, tests)")


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    try:
        engines = parse_targets(args.engines)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return RouterConfig(
        tokenizer=args.tokenizer, engines=engines, policy=args.policy,
        staleness_bound_s=args.staleness_bound, queue_ratio=args.queue_ratio, cache_weight=args.cache_weight,
        balance_requests=args.balance_requests,
        dns_refresh_s=args.dns_refresh, heartbeat_ms=args.heartbeat_ms,
        default_max_tokens=args.default_max_tokens, max_tokens_limit=args.max_tokens_limit,
        max_prompt_tokens=args.max_prompt_tokens, max_stop_strings=args.max_stop_strings,
        max_stop_string_bytes=args.max_stop_string_bytes,
        max_concurrent_streams=args.max_concurrent_streams, max_attempts=args.max_attempts,
        retry_after_s=args.retry_after, auth_token=args.auth_token, tls_cert=args.tls_cert,
        tls_key=args.tls_key, tls_client_ca=args.tls_client_ca, http_port=args.http_port,
        http_host=args.http_host, detokenize=args.detokenize, engine_stream=args.engine_stream,
    ).validate()
