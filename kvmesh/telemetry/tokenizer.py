"""Tokenizer-side telemetry: token counts on the RPC's span and in the tokens counter."""

from __future__ import annotations

from opentelemetry import trace

from kvmesh.telemetry import attributes as attrs
from kvmesh.telemetry.metrics import TOKENIZER_TOKENS


def record_tokens(operation: str, num_tokens: int) -> None:
    """`operation` is "tokenize", "detokenize", "chat_template" or "detokenize_stream"."""
    TOKENIZER_TOKENS.labels(operation).inc(num_tokens)
    trace.get_current_span().set_attribute(attrs.TOKENIZER_NUM_TOKENS, num_tokens)
