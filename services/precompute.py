"""The system prefix's K/V, a chunk's K/V computed behind it, and the chunk's content address.

One object does each of these once, for the ingestion job and for the server alike, so a chunk
ingested offline and a chunk ingested through the service have the same key and the same K/V.
Build it on the thread that owns the model (its construction runs the model for the prefix).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch

from blend.cache import ChunkKV
from blend.fusor import compute_kv
from blend.prompt import DEFAULT_SYSTEM, build_layout, pack_ids
from services.settings import DEFAULT_TENANT
from store.keys import chunk_key


# Chunk keys remembered (about 4 KB each for 512-token chunks: ~16 MB at most).
KEY_CACHE = 4096


class Precompute:
    def __init__(self, step, tokenizer, fingerprint: str, system: str = DEFAULT_SYSTEM):
        self.step = step
        self.fingerprint = fingerprint
        self.prefix_ids = build_layout(tokenizer, [], "x", system).prefix
        with torch.inference_mode():
            self.prefix: ChunkKV = compute_kv(step, self.prefix_ids)
        self._keys: OrderedDict = OrderedDict()  # (tenant, token ids' int64 bytes) -> key, the most recent last
        self._keys_lock = threading.Lock()  # the model thread and ingestion ask concurrently

    def key(self, token_ids: Sequence[int], tenant: str = DEFAULT_TENANT) -> str:
        """The chunk's content address. A tenant's keys carry the tenant, so one tenant's entries say
        nothing about another's; the default tenant's are the plain addresses `kvblend ingest` writes.

        The last KEY_CACHE chunks' keys are remembered, by their ids' int64 bytes (a served chunk's are packed
        already, `blend.prompt.TokenIds`; bytes hash and compare in one pass, not an int at a time): hashing ten
        ~600-token chunks (JSON and sha256) took 868 us of a request's time to first token on a 2-core CPU, looking
        them up 19 us (`python3 -m services.bench.probe_prompt`, docs/ops/cpu_probe_prompt_s16.txt)."""
        remembered = (tenant, pack_ids(token_ids).tobytes())
        with self._keys_lock:
            key = self._keys.get(remembered)
            if key is not None:
                self._keys.move_to_end(remembered)
                return key
        namespace = self.fingerprint if tenant == DEFAULT_TENANT else f"{self.fingerprint}/t/{tenant}"
        key = chunk_key(namespace, self.prefix_ids, token_ids, self.step.dtype)
        with self._keys_lock:
            self._keys[remembered] = key
            while len(self._keys) > KEY_CACHE:
                self._keys.popitem(last=False)
        return key

    def compute(self, token_ids: Sequence[int]) -> ChunkKV:
        """The chunk's per-layer K/V, computed on its own right behind the system prefix."""
        with torch.inference_mode():
            return compute_kv(self.step, token_ids, behind=self.prefix)
