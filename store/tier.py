"""The one protocol every tier implements; placement, LRU and admission live in `store.tiered`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch


class Tier(Protocol):
    """A flat map from entry key to tensor. A tier never evicts on its own: the tiered store decides.

    `get` returns None for a missing entry or an unreachable backend, and raises
    `store.codec.CorruptEntry` for a damaged one; `put` returns the bytes the entry occupies, or
    None when the write was skipped (backend unreachable). Tensors a tier returns are shared, not
    copies: callers must not modify them in place.
    """

    name: str
    volatile: bool  # lost when the process exits (GPU, CPU); admission gates these

    def contains(self, key: str) -> bool: ...

    def get(self, key: str) -> torch.Tensor | None: ...

    def put(self, key: str, value: torch.Tensor) -> int | None: ...

    def delete(self, key: str) -> None: ...

    def bytes_used(self) -> int: ...

    def entries(self) -> Iterator[tuple[str, int]]:
        """(key, bytes) of what the tier holds now, least recently written first where known."""
        ...
