"""router/capacity.py, exactly: the deployment's max_model_len and the error for a request that no
ready engine holds (UNAVAILABLE while a configured engine that holds it is away)."""

from __future__ import annotations

from types import SimpleNamespace

import grpc

from kvmesh.v1 import common_pb2
from router.capacity import deployment_max_len, too_large_error
from router.policy import Candidate, Scored


def _info(blocks: int, max_len: int = 512) -> common_pb2.ServiceInfo:
    return common_pb2.ServiceInfo(max_model_len=max_len, kv_block_size=16, kv_total_blocks=blocks)


def test_max_len_is_the_model_limit_capped_by_the_largest_cache():
    assert deployment_max_len([_info(40), _info(30)]) == 512  # 640 tokens hold 512
    assert deployment_max_len([_info(20), _info(30)]) == 480
    assert deployment_max_len([_info(30, max_len=256)]) == 256
    assert deployment_max_len([common_pb2.ServiceInfo(max_model_len=512)]) == 512  # no KV size reported
    assert deployment_max_len([]) == 0


def _engine(address: str, blocks: int, up: bool) -> SimpleNamespace:
    # What too_large_error reads of a router.engine_client.EngineClient.
    return SimpleNamespace(address=address, info=_info(blocks), admissible=up)


def _too_big(address: str, blocks: int, need: int) -> Scored:
    c = Candidate(address=address, engine_id=address, block_size=16, total_blocks=blocks, free_blocks=blocks,
                  cached_blocks=0, reserved_blocks=0, waiting_tokens=0, pending_blocks=0, in_flight=0,
                  report_age_s=0.0, stale=False)
    return Scored(c, need, -1, "full")


def test_too_large_for_the_ready_engines_but_not_for_one_away_is_unavailable():
    engines = [_engine("small", 30, up=True), _engine("big", 40, up=False)]
    err = too_large_error(engines, 3, 500, [_too_big("small", 30, 32)])
    assert err.code == grpc.StatusCode.UNAVAILABLE
    assert "needs 32 KV blocks" in err.message and "(big) are unavailable now" in err.message
    err = too_large_error([_engine("small", 30, up=True), _engine("other", 31, up=False)], 3, 500,
                          [_too_big("small", 30, 32)])
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "the largest engine holds 30" in err.message
