"""The step's input buffers: fixed device tensors (the CUDA graphs are captured on them) and the
host staging buffers a step is packed into, copied straight across before the step runs.

Layout, the same on both sides (MT = max tokens per step, MS = max sequences, W = block-table width):

    int64  ids[MT] | pos[MT] | slots[MT] | sample_idx[MS] | gather_dst[MS] | gather_src[MS]
    int32  qsl[MS + 1] | lens[MS] | singles[MS] | bt[MS, W]

On CUDA the staging is pinned and double-buffered: step N+1 is packed while step N's copies may
still be in flight (async scheduling), so consecutive steps use alternate staging sets, each reused
only after the copies of the step before the previous one (its event) completed. On CPU the staging
*is* the device buffer and nothing is copied.
"""

from __future__ import annotations

import numpy as np
import torch


class _Views:
    """Named views of one int64 and one int32 buffer (torch tensors; numpy views on the host)."""

    def __init__(self, i64: torch.Tensor, i32: torch.Tensor, mt: int, ms: int, width: int):
        self.i64, self.i32 = i64, i32
        o = np.cumsum([0, mt, mt, mt, ms, ms, ms])
        self.ids, self.pos, self.slots, self.sample_idx, self.gather_dst, self.gather_src = (
            i64[o[i]:o[i + 1]] for i in range(6))
        self.qsl, self.lens, self.singles = i32[:ms + 1], i32[ms + 1:2 * ms + 1], i32[2 * ms + 1:3 * ms + 1]
        self.bt = i32[3 * ms + 1:].view(ms, width)

    def numpy(self) -> "_Views":
        """The same views as numpy arrays (host buffers only)."""
        out = object.__new__(_Views)
        for name in ("ids", "pos", "slots", "sample_idx", "gather_dst", "gather_src", "qsl", "lens", "singles", "bt"):
            setattr(out, name, getattr(self, name).numpy())
        return out


class StepBuffers:
    """Device input buffers plus host staging. See the module docstring for the layout."""

    def __init__(self, device: torch.device, max_tokens: int, max_seqs: int, width: int):
        self.device = device
        self.cuda = device.type == "cuda"
        n64, n32 = 3 * max_tokens + 3 * max_seqs, 3 * max_seqs + 1 + max_seqs * width
        shape = (max_tokens, max_seqs, width)

        def pair(pin: bool):
            return (torch.zeros(n64, dtype=torch.int64, device="cpu" if pin else device, pin_memory=pin),
                    torch.zeros(n32, dtype=torch.int32, device="cpu" if pin else device, pin_memory=pin))

        self.dev = _Views(*pair(False), *shape)
        if self.cuda:
            hosts = [_Views(*pair(True), *shape) for _ in range(2)]
            self._staging = [(h, h.numpy(), torch.cuda.Event()) for h in hosts]
        else:
            self._staging = [(self.dev, self.dev.numpy(), None)]
        self._next = 0
        self._current = self._staging[0]

    def reset_for_capture(self) -> None:
        """Valid one-token-per-sequence inputs everywhere (what a graph's warm-up and capture read)."""
        d = self.dev
        d.qsl.copy_(torch.arange(d.qsl.numel(), dtype=torch.int32, device=self.device))
        d.lens.fill_(1)
        d.slots.fill_(-1)
        d.ids.zero_(), d.pos.zero_(), d.bt.zero_()

    def reset_for_mixed_capture(self, num_tokens: int, rows: int) -> None:
        """Valid inputs for a mixed graph's warm-up and capture: reset_for_capture's one-token rows in
        the first rows (at most num_tokens of them, the last row left empty), later rows empty."""
        self.reset_for_capture()
        d, k = self.dev, min(rows - 1, num_tokens)
        d.qsl[k + 1:rows + 1].fill_(k)
        d.lens[k:rows].zero_()
        d.singles[:k].copy_(d.qsl[:k])  # qsl[:k] is 0..k-1: row i is a one-token row
        d.singles[k:rows].fill_(rows - 1)

    def staging(self):
        """The next host staging set (numpy views), safe to write: its last copies completed."""
        entry = self._staging[self._next]
        self._next = (self._next + 1) % len(self._staging)
        if entry[2] is not None:
            entry[2].synchronize()
        self._current = entry
        return entry[1]

    def upload(self, packed) -> None:
        """Copy the used prefix of each staged array of a packed step (engine_svc/input_batch.py
        PackedStep) into the device buffers (non-blocking)."""
        host, _, event = self._current
        if not self.cuda:
            return
        d = self.dev
        for name, n in (("ids", packed.padded_tokens), ("pos", packed.padded_tokens), ("slots", packed.padded_tokens),
                        ("sample_idx", packed.num_sampled), ("gather_dst", packed.num_gathered),
                        ("gather_src", packed.num_gathered), ("qsl", packed.num_rows + 1),
                        ("lens", packed.num_rows), ("singles", packed.num_singles), ("bt", packed.num_rows)):
            if n:
                getattr(d, name)[:n].copy_(getattr(host, name)[:n], non_blocking=True)
        event.record()
