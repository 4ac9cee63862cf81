"""What the configured replicas can hold, whether or not each is up right now.

INVALID_ARGUMENT is for a request that is bad whatever the state of the system. A request too large
for every engine that is ready now, but not for a configured engine that is away (restarting,
ejected, draining), is UNAVAILABLE: the same request succeeds once that engine is back. The
deployment's advertised max_model_len follows the same rule: the largest sequence a configured
engine's KV cache holds, within the model's limit.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from kvmesh.serving.errors import InvalidArgument, ServiceError, Unavailable
from kvmesh.v1 import common_pb2
from router.engine_client import EngineClient
from router.policy import Scored


def kv_capacity_tokens(info: common_pb2.ServiceInfo) -> int:
    """Tokens the replica's whole KV cache holds (0 when its info does not say)."""
    return info.kv_total_blocks * info.kv_block_size


def deployment_max_len(infos: Sequence[common_pb2.ServiceInfo]) -> int:
    """The longest sequence the deployment can run: the model's limit, capped by the largest KV cache.
    0 when no engine's info is known."""
    lens = [i.max_model_len for i in infos if i.HasField("max_model_len")]
    if not lens:
        return 0
    capacities = [kv_capacity_tokens(i) for i in infos if i.kv_total_blocks and i.kv_block_size]
    return min(min(lens), max(capacities)) if capacities else min(lens)


def too_large_error(engines: Iterable[EngineClient], num_prompt_tokens: int, max_tokens: int,
                    too_big: Sequence[Scored]) -> ServiceError:
    """The error for a request no ready engine can hold: UNAVAILABLE while a configured engine that
    could hold it is away, else INVALID_ARGUMENT naming both numbers."""
    need = min(s.need_blocks for s in too_big)
    largest = max(s.candidate.total_blocks for s in too_big)
    size = f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) needs {need} KV blocks"
    away = [e.address for e in engines
            if not e.admissible and e.info is not None and e.info.kv_block_size
            and num_prompt_tokens + max_tokens <= kv_capacity_tokens(e.info)]
    if away:
        return Unavailable(f"{size}; the largest ready engine holds {largest}; the engine(s) that could hold it "
                           f"({', '.join(sorted(away))}) are unavailable now: retry shortly")
    return InvalidArgument("sampling.max_tokens", f"{size}; the largest engine holds {largest}")
