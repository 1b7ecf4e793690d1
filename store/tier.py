"""The one protocol every tier implements, health included; placement, LRU and admission live in
`store.tiered`, and `store.open` is the one file that names concrete tiers."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import torch

from store.codec import CorruptEntry


class Health(Protocol):
    """What a tier knows about its backend. Memory is always available and never skips a write; disk
    is unavailable after repeated OS errors (each a miss or a skipped write) until a call or `check()`
    succeeds; Redis is unavailable during an outage, when reads miss and writes are skipped and
    counted, and available again once a call succeeds."""

    @property
    def available(self) -> bool:
        """False while the backend is known to be down; no call is made to find out."""
        ...

    @property
    def skipped_writes(self) -> int:
        """Puts dropped because the backend was down, since the tier was opened."""
        ...

    def check(self) -> bool:
        """Ask the backend now (ignoring any back-off), update `available`, and return it."""
        ...


class Tier(Health, Protocol):
    """A flat map from entry key to tensor. A tier never evicts on its own: the tiered store decides.

    `get` returns None for a missing entry or an unreachable backend, and raises
    `store.codec.CorruptEntry` for a damaged one; `get_many` is `get` of several keys at once (one
    round trip where the backend allows), each damaged entry given as its CorruptEntry in the list
    rather than raised, so one bad entry spoils no other; `put` returns the bytes the entry occupies, or
    None when the write was skipped (backend unreachable). Tensors a tier returns are shared, not
    copies: callers must not modify them in place.
    """

    name: str
    volatile: bool  # lost when the process exits (GPU, CPU); admission gates these

    def contains(self, key: str) -> bool: ...

    def get(self, key: str) -> torch.Tensor | None: ...

    def get_many(self, keys: Sequence[str]) -> list[torch.Tensor | None | CorruptEntry]: ...

    def put(self, key: str, value: torch.Tensor) -> int | None: ...

    def delete(self, key: str) -> None: ...

    def bytes_used(self) -> int: ...

    def entries(self) -> Iterator[tuple[str, int]]:
        """(key, bytes) of what the tier holds now, least recently written first where known."""
        ...


class Persistent(Tier, Protocol):
    """A tier that outlives the process (disk, Redis), so it can hold entries no process will finish."""

    def idle_entries(self, idle_s: float) -> list[str]:
        """Keys of entries not written (disk) or not used (Redis) for at least `idle_s` seconds."""
        ...


def get_each(tier: Tier, keys: Sequence[str]) -> list[torch.Tensor | None | CorruptEntry]:
    """`get_many` as one `get` per key: for tiers where a batch saves nothing (memory, disk)."""
    values: list[torch.Tensor | None | CorruptEntry] = []
    for key in keys:
        try:
            values.append(tier.get(key))
        except CorruptEntry as err:
            values.append(err)
    return values
