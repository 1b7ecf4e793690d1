"""Orphaned layers (a chunk's layer entries with no manifest in any tier: an ingest that died between its
layers and its manifest) are swept from disk and Redis once idle past the age rule; a whole chunk, a chunk
whose manifest is in another tier, and the layers of an ingest still writing stay."""

import os
import time

from tests.helpers.kv import REDIS_URL, make_chunk

from store.chunks import ChunkStore
from store.disk_tier import DiskTier
from store.keys import chunk_key, layer_key, manifest_key
from store.memory_tier import MemoryTier
from store.redis_tier import RedisTier
from store.tiered import TieredStore

IDLE_S = 3  # Redis counts idle time in whole seconds; a fresh entry stays this far from the rule


def key_of(chunk) -> str:
    return chunk_key("fp", [], chunk.token_ids, chunk.kv.dtype)


def write_layers(tier, chunk) -> list[str]:
    keys = [layer_key(key_of(chunk), index) for index in range(chunk.kv.shape[0])]
    for index, key in enumerate(keys):
        assert tier.put(key, chunk.kv[index]) is not None
    return keys


def test_layers_without_a_manifest_idle_past_the_age_rule_are_swept_from_disk_and_redis(redis_prefix, tmp_path):
    disk, redis_tier = DiskTier(tmp_path / "kv"), RedisTier(REDIS_URL, prefix=redis_prefix)
    store = ChunkStore(TieredStore([MemoryTier("cpu"), disk, redis_tier], [1 << 20, None, None]))
    whole, died, split, writing = (make_chunk(seed) for seed in range(4))
    for tier in (disk, redis_tier):
        ChunkStore(TieredStore([tier], [None])).put(key_of(whole), whole)
        died_keys = write_layers(tier, died)
    split_disk_keys = write_layers(disk, split)
    redis_tier.put(manifest_key(key_of(split)), store.tiered.get(manifest_key(key_of(whole))))  # any manifest
    assert disk.put("not-a-chunk:0", whole.kv[0]) is not None  # another writer's entry: not the sweep's
    time.sleep(IDLE_S + 1.5)
    writing_keys = write_layers(disk, writing)
    write_layers(redis_tier, writing)

    assert store.sweep_orphans(IDLE_S) == len(died_keys)  # each key from every tier
    for tier in (disk, redis_tier):
        assert not any(tier.contains(key) for key in died_keys), tier.name
        assert store.contains(key_of(whole)) and tier.contains(manifest_key(key_of(whole)))
        assert all(tier.contains(key) for key in writing_keys), tier.name  # still being written: too young
    assert all(disk.contains(key) for key in split_disk_keys)  # its manifest is in Redis
    assert disk.contains("not-a-chunk:0")

    for key in writing_keys:  # an ingest that never finished, an hour later on disk
        os.utime(disk.root / key[:2] / key, (time.time() - 3600, time.time() - 3600))
    assert store.sweep_orphans(IDLE_S) == len(writing_keys)
    assert not any(tier.contains(key) for tier in (disk, redis_tier) for key in writing_keys)


def test_nothing_is_swept_while_a_tier_that_may_hold_the_manifest_does_not_answer(tmp_path):
    disk = DiskTier(tmp_path / "kv")
    store = ChunkStore(TieredStore([disk, RedisTier("redis://127.0.0.1:1/0", retry_s=60)], [None, None]))
    keys = write_layers(disk, make_chunk(5))
    store.tiered.tiers[1].contains("x:0")  # finds Redis down
    for key in keys:
        os.utime(disk.root / key[:2] / key, (time.time() - 3600, time.time() - 3600))
    assert store.sweep_orphans(IDLE_S) == 0 and all(disk.contains(key) for key in keys)
