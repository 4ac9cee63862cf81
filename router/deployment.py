"""What the deployment behind this router is: model, limits, capabilities (GetInfo, ListModels, RequestLimits)."""

from __future__ import annotations

import os

import kvmesh
from kvmesh.serving.errors import Unavailable
from kvmesh.v1 import SCHEMA_REVISION, common_pb2, router_pb2, tokenizer_pb2
from router.capacity import deployment_max_len
from router.config import RouterConfig
from router.engines import EnginePool
from router.validation import RequestLimits

CAPABILITIES = ["text", "chat", "token_ids", "stop_strings", "logprobs", "seed", "failover",
                "kv_aware_routing"]


class Deployment:
    """Joins the tokenizer's info and the engines' info into the router's answers."""

    def __init__(self, config: RouterConfig, pool: EnginePool):
        self._config = config
        self._pool = pool
        self.tokenizer: tokenizer_pb2.TokenizerInfo | None = None

    def _engine_infos(self) -> list[common_pb2.ServiceInfo]:
        ready = [e.info for e in self._pool.ready()]
        return ready or [e.info for e in self._pool.engines.values() if e.info is not None]

    @property
    def model(self) -> str:
        infos = self._engine_infos()
        if infos:
            return infos[0].model
        return self.tokenizer.service.model if self.tokenizer is not None else ""

    @property
    def max_model_len(self) -> int:
        """What a configured engine can run (ready now or not: see router/capacity.py)."""
        known = [e.info for e in self._pool.engines.values() if e.info is not None]
        if (max_len := deployment_max_len(known)):
            return max_len
        return self.tokenizer.max_length if self.tokenizer is not None else 0

    def limits(self) -> RequestLimits:
        """The current limits. Raises Unavailable before the tokenizer and an engine were reached."""
        if self.tokenizer is None or not self._engine_infos():
            raise Unavailable("the router has not reached its tokenizer and an engine yet")
        max_len = self.max_model_len
        c = self._config
        return RequestLimits(model=self.model, max_model_len=max_len, vocab_size=self.tokenizer.vocab_size,
                      default_max_tokens=c.default_max_tokens, max_tokens_limit=c.max_tokens_limit,
                      max_prompt_tokens=min(c.max_prompt_tokens or max_len, max_len),
                      max_stop_strings=min(c.max_stop_strings, self.tokenizer.max_stop_strings or c.max_stop_strings),
                      max_stop_string_bytes=min(c.max_stop_string_bytes,
                                                self.tokenizer.max_stop_string_bytes or c.max_stop_string_bytes))

    def service_info(self) -> common_pb2.ServiceInfo:
        info = common_pb2.ServiceInfo(name="kvmesh-router", version=kvmesh.__version__,
                                      schema_revision=SCHEMA_REVISION, model=self.model,
                                      capabilities=CAPABILITIES, pid=os.getpid(),
                                      max_tokens_limit=self._config.max_tokens_limit,
                                      default_max_tokens=self._config.default_max_tokens)
        if self.max_model_len:
            info.max_model_len = self.max_model_len
        if self.tokenizer is not None:
            info.vocab_size = self.tokenizer.vocab_size
            info.eos_token_ids.extend(self.tokenizer.eos_token_ids)
            if self.tokenizer.HasField("bos_token_id"):
                info.bos_token_id = self.tokenizer.bos_token_id
        return info

    def list_models(self) -> router_pb2.ListModelsResponse:
        if not self.model:
            return router_pb2.ListModelsResponse()
        entry = router_pb2.ModelEntry(name=self.model, num_ready_replicas=len(self._pool.ready()))
        if self.max_model_len:
            entry.max_model_len = self.max_model_len
        return router_pb2.ListModelsResponse(models=[entry])
