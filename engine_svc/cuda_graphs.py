"""Captured steps, all on the runner's fixed input buffers (engine_svc/step_buffers.py).

Decode: graphs per batch size B. Each reads ids/pos/slots[:B], qsl[:B + 1], lens[:B] and the
full-width block table bt[:B]; a step packs its inputs there (padding rows write nowhere: slot -1)
and replays. Nothing is copied at replay time. A B has one graph per attention launch plan over the
context lengths (the backend's decode_graph_lengths: the Triton kernel's split count depends on the
batch's longest sequence), and a step replays the one captured at the shortest length that holds it.

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

import bisect

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


def _capture_sizes(make, sizes: list, device: torch.device) -> dict:
    """make(size, pool) for every size (an int, or a tuple ordered by its first entry), largest first:
    smaller graphs reuse the largest one's pool."""
    graphs, pool = {}, None
    for size in sorted(sizes, reverse=True):
        graphs[size] = make(size, pool)
        pool = graphs[size].graph.pool()
    torch.cuda.synchronize(device)
    return graphs


class DecodeGraph:
    """One captured pure-decode step for a fixed batch size, planned for sequences of up to max_seq_len.

    capture=False runs the same padded step eagerly (the CPU tests check padding and the choice of
    graph that way)."""

    def __init__(self, model, kv_caches, backend, buffers, batch_size: int, max_seq_len: int, pool=None,
                 capture: bool = True):
        d, B = buffers.dev, batch_size
        self.batch_size, self.max_seq_len = B, max_seq_len
        meta = AttentionMetadata(
            query_start_loc=d.qsl[:B + 1], seq_lens=d.lens[:B], block_tables=d.bt[:B], slot_mapping=d.slots[:B],
            max_query_len=1, max_seq_len=max_seq_len, num_seqs=B)
        self._run = lambda: model(d.ids[:B], d.pos[:B], kv_caches, meta, backend)
        self.graph = self.out = None
        if capture:
            self.graph, self.out = _capture(self._run, buffers.device, pool)

    def replay(self) -> torch.Tensor:
        """Run the step on whatever the input buffers hold; hidden states [B, hidden]."""
        if self.graph is None:
            with torch.inference_mode():
                return self._run()
        self.graph.replay()
        return self.out


class DecodeGraphs:
    """The decode graphs by batch size, and by the longest sequence each was planned for."""

    def __init__(self, graphs):
        by_size: dict[int, list] = {}
        for g in graphs:
            by_size.setdefault(g.batch_size, []).append(g)
        self.sizes = sorted(by_size)
        self._graphs = {b: sorted(gs, key=lambda g: g.max_seq_len) for b, gs in by_size.items()}
        self._lengths = {b: [g.max_seq_len for g in gs] for b, gs in self._graphs.items()}

    def __bool__(self) -> bool:
        return bool(self.sizes)

    def __len__(self) -> int:
        return sum(len(gs) for gs in self._graphs.values())

    def batch_size_for(self, num_seqs: int) -> int | None:
        """The captured batch size a step of num_seqs sequences pads to; None: larger than any."""
        if not self.sizes or num_seqs > self.sizes[-1]:
            return None
        return self.sizes[bisect.bisect_left(self.sizes, num_seqs)]

    def graph(self, batch_size: int, max_seq_len: int):
        """The graph of batch_size planned for the shortest length >= max_seq_len (the limit's graph
        holds every step the scheduler makes)."""
        lengths = self._lengths[batch_size]
        return self._graphs[batch_size][min(bisect.bisect_left(lengths, max_seq_len), len(lengths) - 1)]


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


def capture_decode_graphs(model, kv_caches, backend, buffers, max_num_seqs: int, max_model_len: int,
                          model_cfg, kv_fp8: bool) -> DecodeGraphs:
    """Graphs for every size in GRAPH_BATCH_SIZES up to max_num_seqs, at each of the backend's decode
    graph lengths, into one pool."""
    buffers.reset_for_capture()
    c = model_cfg
    keys = [(b, n) for b in GRAPH_BATCH_SIZES if b <= max_num_seqs
            for n in backend.decode_graph_lengths(b, c.num_heads, c.num_kv_heads, c.head_dim, max_model_len,
                                                  buffers.device, kv_fp8)]
    graphs = _capture_sizes(lambda key, pool: DecodeGraph(model, kv_caches, backend, buffers, *key, pool),
                            keys, buffers.device)
    return DecodeGraphs(graphs.values())
