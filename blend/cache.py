"""The per-request KV buffer and the per-chunk KV entry, in one layout.

Layout is token-major, `[layer, position, 2 (k, v), kv_heads, head_dim]`: a chunk occupying
positions [a, a + T) of a layer is one contiguous block, in the buffer and in the chunk entry
(`[layer, T, 2, kv_heads, head_dim]`), so placing a chunk is one plain contiguous copy per layer,
which is what lets a GPU source issue it as a single asynchronous DMA.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch


@dataclass(eq=False)
class KVCache:
    data: torch.Tensor  # [n_layers, capacity, 2, n_kv_heads, head_dim]
    # Where `data` sits in a KVPool's buffer (a view of it), or None for a buffer of its own.
    pool: "KVPool | None" = None
    offset: int = 0

    @classmethod
    def empty(cls, n_layers, capacity, n_kv_heads, head_dim, dtype, device) -> "KVCache":
        # zeros, not empty: a masked-out slot still enters the attention matmul, and NaN * 0 is NaN.
        return cls(torch.zeros(n_layers, capacity, 2, n_kv_heads, head_dim, dtype=dtype, device=device))

    @property
    def capacity(self) -> int:
        return self.data.shape[1]

    def write(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.write_stacked(layer, positions, torch.stack((k, v), dim=1))

    def write_stacked(self, layer: int, positions: torch.Tensor, kv: torch.Tensor) -> None:
        """K and V already stacked as [T, 2, kv_heads, head_dim] (a batch stacks them once for all)."""
        self.data[layer].index_copy_(0, positions.to(self.data.device), kv.to(self.data.dtype))

    def keys_values(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        block = self.data[layer, :length]
        return block[:, 0].transpose(0, 1), block[:, 1].transpose(0, 1)


class KVPool:
    """One KV buffer every request's cache is a range of (issue 18): `[n_layers, tokens, 2, kv_heads,
    head_dim]`, allocated once. A request's cache is a view of a contiguous range, so a batched decode
    step attends every request through one base address with per-request offsets and lengths (one
    varlen attention call, no gather), and a CUDA graph captured once over the pool serves every
    request. The first `block` positions are scratch: padding rows of a graphed batch write and attend
    there. A range is freed when its cache is garbage-collected; `take` returns None when no free range
    is large enough (the caller then allocates a buffer of its own). Thread-safe.

    `longest`: the most positions one range may hold (the model's context, rounded up to the block; default
    the whole pool). A decode step's attention is told no row sees more keys than that: a bound the kernel
    sizes its work by, so a pool of 250K positions does not make a 5K-token request's decode walk 250K.
    A cache asked for beyond it is refused like one that finds no room."""

    def __init__(self, n_layers, tokens, n_kv_heads, head_dim, dtype, device, block: int = 512,
                 longest: int | None = None):
        if tokens < 2 * block:
            raise ValueError(f"a KV pool of {tokens} tokens is smaller than two blocks of {block}")
        if longest is not None and longest < 1:
            raise ValueError(f"longest range {longest} must be at least 1 position")
        self.block = block
        self.longest = min(tokens - block, -(-longest // block) * block) if longest else tokens - block
        self.data = torch.zeros(n_layers, tokens, 2, n_kv_heads, head_dim, dtype=dtype, device=device)
        self._free = [(block, tokens - block)]  # sorted (start, length) ranges; [0, block) is scratch
        self._lock = threading.Lock()
        self.misses = 0  # `take`s that found no free range large enough (their caller allocated its own)

    @property
    def tokens(self) -> int:
        return self.data.shape[1]

    @property
    def free_tokens(self) -> int:
        with self._lock:
            return sum(length for _, length in self._free)

    def take(self, capacity: int) -> KVCache | None:
        """A cache of `capacity` positions (rounded up to the block) as a view of a free range, or None."""
        size = -(-capacity // self.block) * self.block
        with self._lock:
            if size > self.longest:
                self.misses += 1
                return None
            for index, (start, length) in enumerate(self._free):
                if length >= size:
                    if length == size:
                        del self._free[index]
                    else:
                        self._free[index] = (start + size, length - size)
                    break
            else:
                self.misses += 1
                return None
        cache = KVCache(self.data[:, start : start + size], self, start)
        weakref.finalize(cache, self._give_back, start, size)
        return cache

    def _give_back(self, start: int, size: int) -> None:
        with self._lock:
            ranges = sorted(self._free + [(start, size)])
            merged = [ranges[0]]
            for begin, length in ranges[1:]:
                last_begin, last_length = merged[-1]
                if last_begin + last_length == begin:
                    merged[-1] = (last_begin, last_length + length)
                else:
                    merged.append((begin, length))
            self._free = merged

    def layer_rows(self, layer: int) -> torch.Tensor:
        """Layer's pool as rows [tokens, 2, kv_heads, head_dim] (a view): row offset + p is position p."""
        return self.data[layer]


@dataclass(frozen=True)
class ChunkKV:
    """Per-layer K/V of one chunk, computed on its own. K is rotated at positions [start, start + T)."""

    token_ids: tuple[int, ...]
    start: int
    kv: torch.Tensor  # [n_layers, T, 2, n_kv_heads, head_dim]

    def __len__(self) -> int:
        return len(self.token_ids)
