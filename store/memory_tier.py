"""GPU and CPU tiers: tensors held in a dict on one device (CPU pinned when CUDA is present)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import torch

from store.codec import CorruptEntry
from store.tier import get_each


class MemoryTier:
    volatile = True
    available = True  # health (store.tier.Health): a local memory tier is never down
    skipped_writes = 0
    # GPU-memory entries put so far (`put`; counted before the entry can be read): a request that copies this tier's
    # blocks on a stream of its own checks whether one was put since it last waited for the compute stream, on which
    # the put's copy may still be queued (store.source, PLACE_DEVICE).
    writes = 0

    def __init__(self, name: str, device: str | torch.device = "cpu", pin: bool | None = None):
        self.name = name
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"tier {name!r} wants device {self.device} but CUDA is not available")
        # Pinned host memory lets the copy to the GPU be one asynchronous DMA.
        self.pin = torch.cuda.is_available() and self.device.type == "cpu" if pin is None else pin
        self._entries: dict[str, torch.Tensor] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def check(self) -> bool:
        return True

    def contains(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> torch.Tensor | None:
        return self._entries.get(key)

    def get_many(self, keys: Sequence[str]) -> list[torch.Tensor | None | CorruptEntry]:
        return get_each(self, keys)

    def put(self, key: str, value: torch.Tensor) -> int:
        # Own a copy: a caller's tensor may be a view into a larger one, or be modified later.
        # Integer tensors (chunk manifests) stay on the host even in a GPU tier: reading one back must
        # not make the request wait for the GPU.
        device = self.device if value.is_floating_point() else torch.device("cpu")
        stored = torch.empty(value.shape, dtype=value.dtype, device=device,
                             pin_memory=self.pin and device.type == "cpu")
        stored.copy_(value)
        size = stored.numel() * stored.element_size()
        with self._lock:
            old = self._entries.get(key)
            self._bytes += size - (0 if old is None else old.numel() * old.element_size())
            if stored.is_cuda:
                self.writes += 1
            self._entries[key] = stored
        return size

    def delete(self, key: str) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.numel() * old.element_size()

    def bytes_used(self) -> int:
        return self._bytes

    def entries(self) -> Iterator[tuple[str, int]]:
        with self._lock:
            items = list(self._entries.items())
        return iter([(key, value.numel() * value.element_size()) for key, value in items])
