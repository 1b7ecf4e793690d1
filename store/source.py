"""A `KVSource` (blend.fusor) backed by the store: segments' K/V delivered one layer at a time.

While the fusor computes layer i, a background thread is already reading layer i + 1 of every
segment from the tiers, so store latency hides behind compute. A segment missing from the store
(no manifest) is computed on its own by the `compute` callback, used and written back; a layer that
went missing after the manifest was read (evicted, corrupt) makes that segment recompute the same
way, so the fusor never gets a partial or wrong segment.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from blend.cache import ChunkKV
from store.chunks import ChunkStore, Compute, Manifest

log = logging.getLogger(__name__)


class MissingChunk(LookupError):
    pass


class StoreSource:
    """Segments by chunk key (system prefix first); use it as a context manager, or read every layer."""

    def __init__(self, store: ChunkStore, keys: Sequence[str], compute: Compute | None = None,
                 device: str | torch.device = "cpu", prefetch: bool = True):
        self.store = store
        self.keys = list(keys)
        self.compute = compute
        self.device = torch.device(device)
        self.computed: dict[int, ChunkKV] = {}  # segments the store could not serve, by position
        self.manifests: list[Manifest | None] = []
        for index, key in enumerate(self.keys):  # each looked up on its own: one miss spoils nothing else
            manifest = store.manifest(key)
            self.manifests.append(manifest)
            if manifest is None:
                self._recompute(index, "not in the store")
        self.starts = [manifest.start if manifest is not None else self.computed[index].start
                       for index, manifest in enumerate(self.manifests)]
        layer_counts = {m.n_layers for m in self.manifests if m is not None}
        layer_counts |= {chunk.kv.shape[0] for chunk in self.computed.values()}
        if len(layer_counts) > 1:
            raise ValueError(f"segments have different layer counts {sorted(layer_counts)} (mixed models?)")
        self.n_layers = layer_counts.pop() if layer_counts else 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kv-prefetch") if prefetch else None
        self._pending: dict[int, Future] = {}
        if self._pool is not None and self.n_layers:  # layer 0 loads while the caller sets up
            self._pending[0] = self._pool.submit(self._load, 0)

    def _recompute(self, index: int, why: str) -> ChunkKV:
        key = self.keys[index]
        if self.compute is None:
            raise MissingChunk(f"chunk {key} is {why} and no compute callback was given (ingest it first)")
        with torch.inference_mode():  # inference mode is per thread; this may run on the prefetch thread
            chunk = self.compute(index)
        manifest = self.manifests[index]
        if manifest is not None and (chunk.start, tuple(chunk.token_ids)) != (manifest.start,
                                                                               manifest.token_ids):
            raise ValueError(f"compute({index}) returned K/V of other tokens or start {chunk.start} than "
                             f"chunk {key} (start {manifest.start}) holds")
        log.info("store: chunk %s %s; computed it on its own", key, why)
        self.computed[index] = chunk
        self.store.put(key, chunk)
        return chunk

    def _load(self, layer: int) -> list[torch.Tensor]:
        blocks = []
        for index, key in enumerate(self.keys):
            chunk = self.computed.get(index)
            block = None
            if chunk is None:
                block = self.store.layer(key, self.manifests[index], layer)
                if block is None:
                    chunk = self._recompute(index, f"missing layer {layer}")
            if chunk is not None:
                block = chunk.kv[layer]
            blocks.append(block.to(self.device, non_blocking=True))
        return blocks

    def layer(self, index: int) -> list[torch.Tensor]:
        if not 0 <= index < self.n_layers:
            raise IndexError(f"layer {index} is outside the segments' {self.n_layers} layers")
        if self._pool is None:
            return self._load(index)
        pending = self._pending.pop(index, None) or self._pool.submit(self._load, index)
        if index + 1 < self.n_layers and index + 1 not in self._pending:
            self._pending[index + 1] = self._pool.submit(self._load, index + 1)
        blocks = pending.result()
        if index + 1 == self.n_layers:
            self.close()
        return blocks

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            self._pending.clear()

    def __enter__(self) -> "StoreSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
