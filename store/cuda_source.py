"""Layer-pipelined chunk-KV loading onto a CUDA device: a `KVSource` for the fusor.

Chunk K/V lives in pinned host memory, one contiguous [T, 2, kv_heads, head_dim] block per chunk and
layer. While the fusor computes layer i, a side stream copies layer i + 1 of every chunk into one of
two device buffers (double buffering); each copy is a plain contiguous host-to-device DMA. Ordering is
by CUDA events only, never a device-wide synchronize:

- `ready[b]`, recorded on the copy stream after buffer b is filled; the compute stream waits on it
  before the fusor reads the layer;
- `free[b]`, recorded on the compute stream when the fusor asks for the next layer (everything that
  read buffer b, i.e. the placement of the previous layer, was enqueued before); the copy stream waits
  on it before overwriting b.

`SyncPinnedSource` is the same copies issued on the compute stream, not overlapped: the baseline the
pipelined source is measured against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from blend.cache import ChunkKV


def pin(entries: Sequence[ChunkKV]) -> list[ChunkKV]:
    """Host copies of chunk entries in pinned memory (what the CPU tier holds on a CUDA machine)."""
    return [ChunkKV(e.token_ids, e.start, e.kv.detach().to("cpu").pin_memory()) for e in entries]


class PipelinedSource:
    def __init__(self, entries: Sequence[ChunkKV], device: torch.device | str = "cuda", timeline: bool = False):
        self.entries = list(entries)
        # timeline: record CUDA events around every layer's copies and at every layer's request, so a
        # profile can show the copy of layer i + 1 running while layer i computes.
        self.timeline = {"copy_start": {}, "copy_end": {}, "compute_start": {}} if timeline else None
        for entry in self.entries:
            if not entry.kv.is_pinned():
                raise ValueError("PipelinedSource needs chunk K/V in pinned host memory (see store.cuda_source.pin)")
        self.starts = [e.start for e in self.entries]
        self.device = torch.device(device)
        self.n_layers = self.entries[0].kv.shape[0] if self.entries else 0
        self.lengths = [len(e) for e in self.entries]
        self.offsets = [sum(self.lengths[:i]) for i in range(len(self.lengths))]
        total = sum(self.lengths)
        shape = (total, *self.entries[0].kv.shape[2:]) if self.entries else (0,)
        dtype = self.entries[0].kv.dtype if self.entries else torch.float32
        self.buffers = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(2)]
        self.copy_stream = torch.cuda.Stream(self.device)
        self.ready = [torch.cuda.Event() for _ in range(2)]
        self.free = [torch.cuda.Event() for _ in range(2)]
        self.issued = -1
        self._issue(0)
        self._issue(1)

    def _issue(self, layer: int) -> None:
        if layer >= self.n_layers or layer <= self.issued:
            return
        slot = layer % 2
        with torch.cuda.stream(self.copy_stream):
            if layer >= 2:
                self.copy_stream.wait_event(self.free[slot])
            buffer = self.buffers[slot]
            self._mark("copy_start", layer, self.copy_stream)
            for entry, offset, length in zip(self.entries, self.offsets, self.lengths):
                buffer[offset : offset + length].copy_(entry.kv[layer], non_blocking=True)
            self._mark("copy_end", layer, self.copy_stream)
            self.ready[slot].record(self.copy_stream)
        self.issued = layer

    def layer(self, index: int) -> list[torch.Tensor]:
        slot = index % 2
        compute = torch.cuda.current_stream(self.device)
        if index >= 1:
            # The previous layer's buffer has been consumed by work already enqueued: free it, and
            # start filling it with layer index + 1 while this layer computes.
            self.free[(index - 1) % 2].record(compute)
            self._issue(index + 1)
        self._issue(index)
        compute.wait_event(self.ready[slot])
        self._mark("compute_start", index, compute)
        buffer = self.buffers[slot]
        return [buffer[offset : offset + length] for offset, length in zip(self.offsets, self.lengths)]


    def _mark(self, kind: str, layer: int, stream) -> None:
        if self.timeline is not None:
            event = torch.cuda.Event(enable_timing=True)
            event.record(stream)
            self.timeline[kind][layer] = event

    def timeline_ms(self) -> list[dict]:
        """Per layer, after a synchronize: when its copy ran and when its compute began (ms from the
        first copy). Layer i's compute spans compute_start[i] .. compute_start[i + 1]."""
        marks = self.timeline
        origin = marks["copy_start"][0]
        rows = []
        for layer in range(self.n_layers):
            rows.append({"layer": layer,
                         "copy_start": round(origin.elapsed_time(marks["copy_start"][layer]), 3),
                         "copy_end": round(origin.elapsed_time(marks["copy_end"][layer]), 3),
                         "compute_start": round(origin.elapsed_time(marks["compute_start"][layer]), 3)})
        return rows


class SyncPinnedSource:
    """Each layer copied host-to-device on the compute stream when asked for: loading not overlapped."""

    def __init__(self, entries: Sequence[ChunkKV], device: torch.device | str = "cuda"):
        self.entries = list(entries)
        self.starts = [e.start for e in self.entries]
        self.device = torch.device(device)

    def layer(self, index: int) -> list[torch.Tensor]:
        return [e.kv[index].to(self.device, non_blocking=False) for e in self.entries]
