"""Captured decode steps: one CUDA graph per batch size, all on the runner's fixed input buffers.

A graph of batch size B reads ids/pos/slots[:B], qsl[:B + 1], lens[:B] and the full-width block
table bt[:B] of engine_svc/step_buffers.py; a step packs its inputs there (padding rows write
nowhere: slot -1) and replays. Nothing is copied at replay time.
"""

from __future__ import annotations

import torch

from engine_svc.attention.base import AttentionMetadata

GRAPH_BATCH_SIZES = [1, 2, 4, 8] + list(range(16, 257, 16)) + list(range(288, 513, 32))

# One warm-up stream per device for the whole process: cuBLAS keeps a workspace per stream it ran
# on, for the life of the process, so a new stream per capture (per graph, per engine) would pile
# up tens of MiB each, counted against whichever engine sizes its KV cache next.
_WARMUP_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def warmup_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[device] = torch.cuda.Stream(device)
    return _WARMUP_STREAMS[device]


class DecodeGraph:
    """One captured pure-decode step for a fixed batch size."""

    def __init__(self, model, kv_caches, backend, buffers, batch_size: int, max_model_len: int, pool):
        d, B = buffers.dev, batch_size
        self.batch_size = B
        ids, pos = d.ids[:B], d.pos[:B]
        meta = AttentionMetadata(
            query_start_loc=d.qsl[:B + 1], seq_lens=d.lens[:B], block_tables=d.bt[:B], slot_mapping=d.slots[:B],
            max_query_len=1, max_seq_len=max_model_len, num_seqs=B)
        dev = buffers.device
        with torch.inference_mode():
            side = warmup_stream(dev)  # warm up on a side stream before capture, as torch advises
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(2):
                    model(ids, pos, kv_caches, meta, backend)
            torch.cuda.current_stream(dev).wait_stream(side)
            torch.cuda.synchronize(dev)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self.out = model(ids, pos, kv_caches, meta, backend)
        self.pool = self.graph.pool()

    def replay(self) -> torch.Tensor:
        """Run the step on whatever the input buffers hold; hidden states [B, hidden]."""
        self.graph.replay()
        return self.out


def capture_decode_graphs(model, kv_caches, backend, buffers, max_num_seqs: int,
                          max_model_len: int) -> dict[int, DecodeGraph]:
    """Graphs for every size in GRAPH_BATCH_SIZES up to max_num_seqs, largest first (smaller graphs
    then reuse its memory pool)."""
    buffers.reset_for_capture()
    graphs, pool = {}, None
    for bs in reversed([b for b in GRAPH_BATCH_SIZES if b <= max_num_seqs]):
        graph = DecodeGraph(model, kv_caches, backend, buffers, bs, max_model_len, pool)
        pool = graph.pool
        graphs[bs] = graph
    torch.cuda.synchronize(buffers.device)
    return graphs
