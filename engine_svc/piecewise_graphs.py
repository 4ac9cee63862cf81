"""Captured mixed steps: the model in pieces, one CUDA graph per piece and padded token count, the
attention eager between them (piecewise graphs, as vLLM's V1 runs prefill and mixed steps).

A step that mixes prefill chunks and decode tokens has a ragged shape (which sequences, how long,
where their KV lives) only in attention; everything else in a layer is a row-wise function of the
step's tokens. So the forward is cut at the attention calls (LlamaForCausalLM.first_piece /
middle_piece / last_piece), each piece is captured for every size in MIXED_GRAPH_TOKENS, and a
step of T tokens replays the pieces of the next size up with its tokens padded (padding rows are
row-independent garbage nobody reads; attention and the KV write see only the T real tokens).

Why: an eager mixed step of the 8B model issues ~230 Triton launches and ~130 GEMMs from Python,
20-35 ms of host time, more than the GPU needs for the step (bench/results/step-profile-*). With
pieces the host issues 33 replays and the attention launches.

The pieces talk through static buffers of max_tokens rows (residual stream, q|k|v, attention output,
final hidden states); the input ids and positions are the runner's step buffers. Every graph's
intermediates are dead when its replay ends (outputs are copied into the static buffers), so all
graphs share one memory pool and may replay in any order.
"""

from __future__ import annotations

import bisect

import torch

from engine_svc.attention.base import AttentionMetadata
from engine_svc.cuda_graphs import warmup_stream

MIXED_GRAPH_TOKENS = [64 * i for i in range(1, 17)] + [1280, 1536, 1792, 2048]


class PiecewiseGraphs:
    """The pieces of the model for mixed steps of up to max_tokens tokens.

    Args:
        model: a LlamaForCausalLM (its pieces).
        ids, pos: the runner's device input buffers (int64, at least max_tokens long).
        max_tokens: the largest step the pieces serve (larger steps run eagerly).
        capture: False runs the pieces eagerly (the CPU tests check the decomposition that way).
    """

    def __init__(self, model, ids: torch.Tensor, pos: torch.Tensor, max_tokens: int, capture: bool = True):
        self.model, self.ids, self.pos = model, ids, pos
        self.sizes = [b for b in MIXED_GRAPH_TOKENS if b <= max_tokens]
        self.max_tokens = self.sizes[-1] if self.sizes else 0
        attn = model.layers[0].self_attn
        w = model.embed_tokens.weight
        rows = self.max_tokens
        # Zeros: padding rows start finite; later they hold earlier steps' (finite) values.
        self.residual = torch.zeros(rows, w.shape[1], dtype=w.dtype, device=w.device)
        self.qkv = torch.zeros(rows, attn.q_size + 2 * attn.kv_size, dtype=w.dtype, device=w.device)
        self.attn = torch.zeros(rows, attn.q_size, dtype=w.dtype, device=w.device)
        self.hidden = torch.zeros_like(self.residual)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        if capture and self.sizes:
            self._capture()

    def size_for(self, num_tokens: int) -> int | None:
        """The padded size a step of num_tokens runs at, or None (too large: eager)."""
        if num_tokens > self.max_tokens:
            return None
        return self.sizes[bisect.bisect_left(self.sizes, num_tokens)]

    def run(self, kv_caches, backend, meta: AttentionMetadata, num_tokens: int, size: int) -> torch.Tensor:
        """One step of num_tokens real tokens (inputs in ids/pos[:size], padded): hidden [num_tokens]."""
        graphs = self.graphs.get(size)
        pieces = None if graphs else self._pieces(size)
        layers = self.model.layers
        for i in range(len(layers) + 1):
            if graphs:
                graphs[i].replay()
            else:
                pieces[i]()
            if i == len(layers):
                break
            attn = layers[i].self_attn
            q, k, v = attn.split_heads(self.qkv[:num_tokens])
            self.attn[:num_tokens].copy_(attn.attend(q, k, v, kv_caches[i], meta, backend))
        return self.hidden[:num_tokens]

    def _pieces(self, size: int) -> list:
        """The pieces at one padded size, as closures over the static buffers."""
        model, ids, pos = self.model, self.ids[:size], self.pos[:size]
        residual, qkv, attn, hidden = self.residual[:size], self.qkv[:size], self.attn[:size], self.hidden[:size]

        def first():
            res, _ = model.first_piece(ids, pos, qkv)
            residual.copy_(res)

        def middle(layer):
            def piece():
                res, _ = model.middle_piece(layer, attn, residual, pos, qkv)
                residual.copy_(res)
            return piece

        def last():
            hidden.copy_(model.last_piece(attn, residual))

        return [first] + [middle(i) for i in range(1, len(model.layers))] + [last]

    def _capture(self) -> None:
        """Capture every piece at every size, largest first, into one memory pool."""
        device = self.qkv.device
        pool = None
        with torch.inference_mode():
            side = warmup_stream(device)
            for size in reversed(self.sizes):
                pieces = self._pieces(size)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):  # warm up (cuBLAS plans, Triton variants) off the capture
                    for piece in pieces:
                        piece()
                torch.cuda.current_stream(device).wait_stream(side)
                torch.cuda.synchronize(device)
                graphs = []
                for piece in pieces:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        piece()
                    pool = graph.pool()
                    graphs.append(graph)
                self.graphs[size] = graphs
        torch.cuda.synchronize(device)

    @staticmethod
    def reserve_bytes(model_cfg, dtype: torch.dtype, max_tokens: int) -> int:
        """Device memory the pieces need beyond the KV cache: static buffers and the graphs' pool
        (the largest piece's intermediates: the MLP's gate|up and product, a few hidden-size rows)."""
        c = model_cfg
        qkv = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
        per_token = 3 * c.intermediate_size + 8 * c.hidden_size + 2 * qkv + c.num_heads * c.head_dim
        return int(max_tokens * per_token * torch.empty(0, dtype=dtype).element_size() * 1.25)
