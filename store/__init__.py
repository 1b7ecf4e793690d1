"""Tiered chunk-KV store (issue 4): GPU, CPU, disk and Redis tiers under one LRU, one codec.

    config = StoreConfig(cpu_bytes=4 << 30, disk_path="~/.cache/kvblend/kv", redis_url="redis://host:6379/0")
    chunks = ChunkStore.from_config(config)
    key = chunk_key(model.fingerprint, prefix_ids, token_ids, dtype)
    chunks.put(key, chunk_kv)
    source = StoreSource(chunks, [prefix, *keys], compute=..., device="cuda").begin()  # a KVSource

See docs/store.md for the design, key and codec formats and the configuration fields.
"""

from store.chunks import ChunkStore, Manifest
from store.codec import CorruptEntry
from store.config import StoreConfig
from store.keys import chunk_key
from store.source import MissingChunk, StoreSource
from store.tiered import TieredStore, TierStats

__all__ = ["ChunkStore", "CorruptEntry", "Manifest", "MissingChunk", "StoreConfig", "StoreSource",
           "TierStats", "TieredStore", "chunk_key"]
