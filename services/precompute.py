"""The system prefix's K/V, a chunk's K/V computed behind it, and the chunk's content address.

One object does each of these once, for the ingestion job and for the server alike, so a chunk
ingested offline and a chunk ingested through the service have the same key and the same K/V.
Build it on the thread that owns the model (its construction runs the model for the prefix).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from blend.cache import ChunkKV
from blend.fusor import compute_kv
from blend.prompt import DEFAULT_SYSTEM, build_layout
from services.settings import DEFAULT_TENANT
from store.keys import chunk_key


class Precompute:
    def __init__(self, step, tokenizer, fingerprint: str, system: str = DEFAULT_SYSTEM):
        self.step = step
        self.fingerprint = fingerprint
        self.prefix_ids = build_layout(tokenizer, [], "x", system).prefix
        with torch.inference_mode():
            self.prefix: ChunkKV = compute_kv(step, self.prefix_ids)

    def key(self, token_ids: Sequence[int], tenant: str = DEFAULT_TENANT) -> str:
        """The chunk's content address. A tenant's keys carry the tenant, so one tenant's entries say
        nothing about another's; the default tenant's are the plain addresses `kvblend ingest` writes."""
        namespace = self.fingerprint if tenant == DEFAULT_TENANT else f"{self.fingerprint}/t/{tenant}"
        return chunk_key(namespace, self.prefix_ids, token_ids, self.step.dtype)

    def compute(self, token_ids: Sequence[int]) -> ChunkKV:
        """The chunk's per-layer K/V, computed on its own right behind the system prefix."""
        with torch.inference_mode():
            return compute_kv(self.step, token_ids, behind=self.prefix)
