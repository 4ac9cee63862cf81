"""Captured steps, all on the runner's fixed input buffers (engine_svc/step_buffers.py).

Decode: one graph per batch size B. It reads ids/pos/slots[:B], qsl[:B + 1], lens[:B] and the
full-width block table bt[:B]; a step packs its inputs there (padding rows write nowhere: slot -1)
and replays. Nothing is copied at replay time.

Mixed (prefill chunks and decode tokens, any mix): one graph per padded token count T in
MIXED_GRAPH_TOKENS, over every row of the buffers (max_num_seqs + 1). A step of t <= T tokens in
n sequences packs them as usual and pads: tokens t..T write nowhere and belong to no sequence,
rows n.. have no query tokens (their programs exit at once). The attention grids are upper bounds
(kernels/paged_attention.py), so their sizes depend on T and the row count only, and the step's own
ragged shape lives in device tensors: the graph serves every step up to T tokens. The one-token
sequences are listed (singles, padded with the last row, which never has tokens) for the decode
tiles. Why: an eager mixed step of the 8B model spends 20-35 ms of host time issuing ~230 Triton
launches and ~130 GEMMs, more than its GPU time (bench/results/step-profile-*).
"""

from __future__ import annotations

import torch

from engine_svc.attention.base import AttentionMetadata

GRAPH_BATCH_SIZES = [1, 2, 4, 8] + list(range(16, 257, 16)) + list(range(288, 513, 32))
MIXED_GRAPH_TOKENS = [64 * i for i in range(1, 17)] + [1280, 1536, 1792, 2048]

# One warm-up stream per device for the whole process: cuBLAS keeps a workspace per stream it ran
# on, for the life of the process, so a new stream per capture (per graph, per engine) would pile
# up tens of MiB each, counted against whichever engine sizes its KV cache next.
_WARMUP_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def warmup_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[device] = torch.cuda.Stream(device)
    return _WARMUP_STREAMS[device]


def _capture(run, device: torch.device, pool):
    """Warm `run` up twice on the side stream (as torch advises), then capture it: (graph, output)."""
    with torch.inference_mode():
        side = warmup_stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                run()
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = run()
    return graph, out


def _capture_sizes(make, sizes: list[int], device: torch.device) -> dict:
    """make(size, pool) for every size, largest first: smaller graphs reuse the largest one's pool."""
    graphs, pool = {}, None
    for size in sorted(sizes, reverse=True):
        graphs[size] = make(size, pool)
        pool = graphs[size].graph.pool()
    torch.cuda.synchronize(device)
    return graphs


class DecodeGraph:
    """One captured pure-decode step for a fixed batch size."""

    def __init__(self, model, kv_caches, backend, buffers, batch_size: int, max_model_len: int, pool):
        d, B = buffers.dev, batch_size
        self.batch_size = B
        meta = AttentionMetadata(
            query_start_loc=d.qsl[:B + 1], seq_lens=d.lens[:B], block_tables=d.bt[:B], slot_mapping=d.slots[:B],
            max_query_len=1, max_seq_len=max_model_len, num_seqs=B)
        self.graph, self.out = _capture(lambda: model(d.ids[:B], d.pos[:B], kv_caches, meta, backend),
                                        buffers.device, pool)

    def replay(self) -> torch.Tensor:
        """Run the step on whatever the input buffers hold; hidden states [B, hidden]."""
        self.graph.replay()
        return self.out


class MixedGraph:
    """One captured step of num_tokens (padded) tokens over all `rows` buffer rows.

    capture=False runs the same padded step eagerly (the CPU tests check the padding that way)."""

    def __init__(self, model, kv_caches, backend, buffers, num_tokens: int, rows: int, max_model_len: int,
                 pool=None, capture: bool = True):
        d, T = buffers.dev, num_tokens
        self.num_tokens, self.rows = T, rows
        meta = AttentionMetadata(
            query_start_loc=d.qsl[:rows + 1], seq_lens=d.lens[:rows], block_tables=d.bt[:rows],
            slot_mapping=d.slots[:T],
            max_query_len=min(T, max_model_len), max_seq_len=max_model_len, num_seqs=rows,
            decode_seq_index=d.singles[:rows])
        self._run = lambda: model(d.ids[:T], d.pos[:T], kv_caches, meta, backend)
        self.graph = self.out = None
        if capture:
            buffers.reset_for_mixed_capture(T, rows)
            self.graph, self.out = _capture(self._run, buffers.device, pool)

    def replay(self) -> torch.Tensor:
        """Run the step the input buffers hold; hidden states [num_tokens, hidden] (padding rows are
        garbage, possibly NaN: rows are independent, nothing reads them)."""
        if self.graph is None:
            with torch.inference_mode():
                return self._run()
        self.graph.replay()
        return self.out


def mixed_graph_reserve_bytes(model_cfg, dtype: torch.dtype, max_tokens: int) -> int:
    """Device memory the mixed graphs' pool needs beyond the KV cache: the largest step's live
    intermediates (the MLP's gate|up and product, q|k|v, attention output, a few hidden-size rows)."""
    c = model_cfg
    qkv = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
    per_token = 3 * c.intermediate_size + 8 * c.hidden_size + 2 * qkv + c.num_heads * c.head_dim
    return int(max_tokens * per_token * torch.empty(0, dtype=dtype).element_size() * 1.25)


def capture_mixed_graphs(model, kv_caches, backend, buffers, max_tokens: int, rows: int,
                         max_model_len: int) -> dict[int, MixedGraph]:
    """Graphs for every size in MIXED_GRAPH_TOKENS up to max_tokens, into one pool."""
    return _capture_sizes(
        lambda size, pool: MixedGraph(model, kv_caches, backend, buffers, size, rows, max_model_len, pool),
        [t for t in MIXED_GRAPH_TOKENS if t <= max_tokens], buffers.device)


def capture_decode_graphs(model, kv_caches, backend, buffers, max_num_seqs: int,
                          max_model_len: int) -> dict[int, DecodeGraph]:
    """Graphs for every size in GRAPH_BATCH_SIZES up to max_num_seqs, into one pool."""
    buffers.reset_for_capture()
    return _capture_sizes(lambda size, pool: DecodeGraph(model, kv_caches, backend, buffers, size, max_model_len, pool),
                          [b for b in GRAPH_BATCH_SIZES if b <= max_num_seqs], buffers.device)
