"""The per-request KV buffer and the per-chunk KV entry, in one layout.

Layout is token-major, `[layer, position, 2 (k, v), kv_heads, head_dim]`: a chunk occupying
positions [a, a + T) of a layer is one contiguous block, in the buffer and in the chunk entry
(`[layer, T, 2, kv_heads, head_dim]`), so placing a chunk is one plain contiguous copy per layer,
which is what lets a GPU source issue it as a single asynchronous DMA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    data: torch.Tensor  # [n_layers, capacity, 2, n_kv_heads, head_dim]

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


@dataclass(frozen=True)
class ChunkKV:
    """Per-layer K/V of one chunk, computed on its own. K is rotated at positions [start, start + T)."""

    token_ids: tuple[int, ...]
    start: int
    kv: torch.Tensor  # [n_layers, T, 2, n_kv_heads, head_dim]

    def __len__(self) -> int:
        return len(self.token_ids)
