"""Redis down or unreachable: misses and skipped writes with a warning, never an error; back when it is."""

import logging
import time

import torch
from tests.helpers.kv import RedisServer, computing, make_chunk

from store.chunks import ChunkStore
from store.config import StoreConfig
from store.keys import chunk_key
from store.memory_tier import MemoryTier
from store.redis_tier import RedisTier
from store.tiered import TieredStore

UNREACHABLE = "redis://127.0.0.1:1/0"
RETRY_S = 0.2


def key_of(chunk) -> str:
    return chunk_key("fp", [], chunk.token_ids, chunk.kv.dtype)


def test_start_up_without_redis_logs_it_and_serves_from_memory(caplog):
    config = StoreConfig(cpu_bytes=1 << 20, redis_url=UNREACHABLE, redis_retry_s=RETRY_S, admit_after=1)
    with caplog.at_level(logging.WARNING, logger="store"):
        store = ChunkStore.from_config(config)
    assert "starting without Redis" in caplog.text and "redis://127.0.0.1:1" in caplog.text
    chunks = [make_chunk(seed) for seed in range(2)]
    keys = [key_of(chunk) for chunk in chunks]
    compute, calls = computing(chunks)
    first = store.get_or_compute(keys, compute)
    second = store.get_or_compute(keys, compute)
    assert calls == [0, 1]  # the second request hit the CPU tier
    for chunk, a, b in zip(chunks, first, second):
        assert torch.equal(a.kv, chunk.kv) and torch.equal(b.kv, chunk.kv)
    assert store.tiered.stats()["redis"].hits == 0


def test_without_a_redis_url_the_store_starts_and_says_so(caplog, tmp_path):
    with caplog.at_level(logging.INFO, logger="store"):
        store = ChunkStore.from_config(StoreConfig(cpu_bytes=1 << 20, disk_path=tmp_path))
    assert "no Redis URL" in caplog.text
    assert [tier.name for tier in store.tiered.tiers] == ["cpu", "disk"]


def test_writes_to_an_unreachable_redis_are_skipped_and_counted(caplog):
    redis_tier = RedisTier(UNREACHABLE, retry_s=RETRY_S)
    store = TieredStore([MemoryTier("cpu"), redis_tier], [1, None])  # every entry is pushed toward Redis
    chunk = make_chunk(3)
    with caplog.at_level(logging.WARNING, logger="store"):
        assert ChunkStore(store).put(key_of(chunk), chunk) is False
    assert "unreachable" in caplog.text and redis_tier.skipped_writes >= 1
    assert store.get("anything:0") is None


def test_redis_stopped_mid_run_then_back(redis_server, caplog):
    redis_tier = RedisTier(redis_server.url, prefix="t:", retry_s=RETRY_S)
    store = ChunkStore(TieredStore([redis_tier], [None]))
    chunks = [make_chunk(seed) for seed in range(3)]
    keys = [key_of(chunk) for chunk in chunks]
    assert store.put(keys[0], chunks[0])
    assert torch.equal(store.get(keys[0]).kv, chunks[0].kv)

    redis_server.stop()
    compute, calls = computing(chunks)
    with caplog.at_level(logging.WARNING, logger="store"):
        during = store.get_or_compute(keys[:2], compute)  # the request still succeeds, from compute
    assert calls == [0, 1] and torch.equal(during[1].kv, chunks[1].kv)
    assert "unreachable" in caplog.text and redis_tier.skipped_writes > 0
    assert not redis_tier.available

    redis_server.start()  # a fresh, empty server on the same port
    time.sleep(RETRY_S * 1.5)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="store"):
        assert store.put(keys[2], chunks[2])
    assert "is back" in caplog.text and redis_tier.available
    assert torch.equal(store.get(keys[2]).kv, chunks[2].kv)


def test_while_redis_is_down_it_is_not_asked_again_until_the_retry_time(redis_server):
    redis_tier = RedisTier(redis_server.url, prefix="t:", retry_s=60)
    redis_server.stop()
    assert redis_tier.get("a:0") is None and not redis_tier.available
    redis_server.start()
    assert redis_tier.get("a:0") is None and not redis_tier.available  # still inside the back-off
    assert redis_tier.check() and redis_tier.available  # an explicit check ignores it


def test_a_password_in_the_url_is_used_and_never_logged(caplog):
    server = RedisServer("--requirepass", "s3cret-pw")
    server.start()
    try:
        url = f"redis://:s3cret-pw@127.0.0.1:{server.port}/0"
        assert RedisTier(url, prefix="t:").put("a:0", make_chunk(0).kv[0]) is not None
        assert RedisTier(server.url, prefix="t:").contains("a:0") is False  # without it: refused, a miss
        server.stop()
        with caplog.at_level(logging.WARNING, logger="store"):
            RedisTier(url, prefix="t:").get("a:0")
        assert "unreachable" in caplog.text and "s3cret-pw" not in caplog.text
    finally:
        server.stop()


def test_a_full_redis_that_refuses_writes_skips_them_with_a_warning(caplog):
    server = RedisServer("--maxmemory", "1mb", "--maxmemory-policy", "noeviction")
    server.start()
    try:
        tier = RedisTier(server.url, prefix="t:")
        big = torch.zeros(1 << 19)  # 2 MB: over the server's whole maxmemory
        with caplog.at_level(logging.WARNING, logger="store"):
            assert tier.put("big:0", big) is None
        assert "maxmemory" in caplog.text and tier.skipped_writes == 1 and tier.available
        assert tier.get("big:0") is None
    finally:
        server.stop()


def test_a_chunk_that_cannot_be_stored_logs_one_warning_naming_it(caplog):
    """A 30-layer chunk larger than the only tier's budget: put is False and the log holds one warning
    for the chunk (how many of its 31 entries failed), not one per entry."""
    store = ChunkStore(TieredStore([MemoryTier("cpu")], [16]))
    chunk = make_chunk(n_layers=30)
    key = chunk_key("fp", (), chunk.token_ids, chunk.kv.dtype)
    with caplog.at_level(logging.WARNING, logger="store"):
        assert not store.put(key, chunk)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert key in warnings[0] and "31 of its 31 entries" in warnings[0]
