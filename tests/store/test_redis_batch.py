"""Issue 21: batch reads from Redis (pipelined GETs over a few sockets, values received in place) return
exactly what `get` returns; a damaged value in a batch is a counted miss, never an answer; the source
asks Redis once per layer for all its chunks; a chunk read from Redis is promoted to the CPU tier and then read from there."""

import logging
import time

import pytest
import redis
import torch
from tests.helpers.kv import REDIS_URL, block, make_chunk

from store import codec
from store.chunks import ChunkStore
from store.keys import chunk_key, layer_key
from store.memory_tier import MemoryTier
from store.redis_tier import RedisTier
from store.source import StoreSource
from store.tiered import TieredStore

SECRET = b"test-secret-0123456789abcdef"


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.uint8)


def key_of(chunk) -> str:
    return chunk_key("fp", [], chunk.token_ids, chunk.kv.dtype)


@pytest.fixture
def client():
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


@pytest.mark.parametrize("connections", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_a_batch_read_is_bit_exact_in_order_with_none_for_a_missing_key(redis_prefix, connections, dtype):
    tier = RedisTier(REDIS_URL, redis_prefix, connections=connections)
    values = {f"k:{i}": block(i, shape=(64, 2, 2, 8)).to(dtype) for i in range(5)}
    values["k:0"].view(-1)[:2] = torch.tensor([-0.0, torch.finfo(torch.float32).tiny / 2]).to(dtype)
    for key, value in values.items():
        assert tier.put(key, value) is not None
    keys = ["k:3", "k:0", "absent:0", "k:4", "k:1", "k:2"]
    out = tier.get_many(keys)
    assert out[2] is None
    for key, got in zip(keys, out):
        if key in values:
            assert got.dtype == dtype and got.shape == values[key].shape
            assert torch.equal(bits(got), bits(values[key]))
    tier.close()


def test_a_quantized_batch_read_equals_single_gets(redis_prefix):
    tier = RedisTier(REDIS_URL, redis_prefix, quantize=True, connections=2)
    for i in range(4):
        tier.put(f"k:{i}", block(i, shape=(32, 2, 2, 16), dtype=torch.bfloat16))
    keys = [f"k:{i}" for i in range(4)]
    for got, key in zip(tier.get_many(keys), keys):
        assert torch.equal(bits(got), bits(tier.get(key)))
    tier.close()


def _damage(client, name: str, how: str) -> None:
    value = bytearray(client.get(name))
    if how == "flip":
        value[-3] ^= 0x40  # in the payload
    elif how == "truncate":
        value = value[:-100]
    elif how == "magic":
        value[0:4] = b"XXXX"
    elif how == "short":
        value = value[:5]
    client.set(name, bytes(value))


@pytest.mark.parametrize("connections", [1, 2])
def test_damaged_values_in_a_batch_are_corrupt_entries_and_the_others_are_served(redis_prefix, client,
                                                                                 connections):
    tier = RedisTier(REDIS_URL, redis_prefix, connections=connections)
    values = [block(i, shape=(40, 2, 2, 8)) for i in range(6)]
    keys = [f"k:{i}" for i in range(6)]
    for key, value in zip(keys, values):
        tier.put(key, value)
    for key, how in zip(keys[1:], ["flip", "truncate", "magic", "short"]):
        _damage(client, redis_prefix + key, how)
    for _ in range(2):  # twice: the first batch left each connection in step with the server
        out = tier.get_many(keys)
        assert all(isinstance(got, codec.CorruptEntry) for got in out[1:5])
        assert torch.equal(out[0], values[0]) and torch.equal(out[5], values[5])
    tier.close()


def test_through_the_tiered_store_a_damaged_value_is_a_counted_deleted_miss(redis_prefix, client, caplog):
    tier = RedisTier(REDIS_URL, redis_prefix, connections=2)
    store = TieredStore([tier], [None])
    values = [block(i) for i in range(3)]
    for i, value in enumerate(values):
        store.put(f"k:{i}", value)
    _damage(client, redis_prefix + "k:1", "flip")
    with caplog.at_level(logging.WARNING, logger="store"):
        found = store.get_many_from(["k:0", "k:1", "k:2"])
    assert found[1] == (None, None) and "corrupt" in caplog.text
    assert [tier_name for _, tier_name in found] == ["redis", None, "redis"]
    assert torch.equal(found[0][0], values[0]) and torch.equal(found[2][0], values[2])
    stats = store.stats()["redis"]
    assert (stats.corrupt, stats.hits, stats.misses) == (1, 2, 1)
    assert client.get(redis_prefix + "k:1") is None  # deleted, so a recompute replaces it
    tier.close()


def test_with_a_secret_a_value_copied_from_another_key_is_corrupt_in_a_batch(redis_prefix, client):
    tier = RedisTier(REDIS_URL, redis_prefix, secret=SECRET, connections=2)
    a, b = block(1), block(2)
    tier.put("a:0", a)
    tier.put("b:0", b)
    client.set(redis_prefix + "b:0", client.get(redis_prefix + "a:0"))
    got_a, got_b = tier.get_many(["a:0", "b:0"])
    assert torch.equal(got_a, a) and isinstance(got_b, codec.CorruptEntry)
    unkeyed = RedisTier(REDIS_URL, redis_prefix, connections=2)  # no secret: the copy's crc is valid
    assert torch.equal(unkeyed.get_many(["b:0"])[0], a)
    tier.close()
    unkeyed.close()


def test_a_batch_read_from_a_stopped_redis_is_misses_and_works_again_after_a_restart(redis_server):
    tier = RedisTier(redis_server.url, prefix="t:", retry_s=0.2, connections=2)
    tier.put("k:0", block(0))
    tier.put("k:1", block(1))
    assert all(value is not None for value in tier.get_many(["k:0", "k:1"]))
    redis_server.stop()
    assert tier.get_many(["k:0", "k:1"]) == [None, None] and not tier.available
    redis_server.start()  # a fresh, empty server: the pooled sockets are dead
    time.sleep(0.3)
    assert tier.put("k:1", block(7)) is not None and tier.available
    missing, found = tier.get_many(["k:0", "k:1"])
    assert missing is None and torch.equal(found, block(7))
    tier.close()


def test_the_source_asks_redis_once_per_layer_for_all_its_chunks(redis_prefix, monkeypatch):
    tier = RedisTier(REDIS_URL, redis_prefix, connections=2)
    store = ChunkStore(TieredStore([tier], [None]))
    chunks = [make_chunk(seed, n_layers=4) for seed in range(3)]
    keys = [key_of(chunk) for chunk in chunks]
    for key, chunk in zip(keys, chunks):
        assert store.put(key, chunk)
    batches, singles = [], []
    get_many, get = tier.get_many, tier.get
    monkeypatch.setattr(tier, "get_many", lambda names: batches.append(list(names)) or get_many(names))
    monkeypatch.setattr(tier, "get", lambda name: singles.append(name) or get(name))
    with StoreSource(store, keys) as source:
        layers = [source.layer(i) for i in range(4)]
    assert sorted(batches) == sorted([[layer_key(key, layer) for key in keys] for layer in range(4)])
    assert all(name.endswith(":m") for name in singles)  # only the manifests, one by one
    for slot, chunk in enumerate(chunks):
        assert torch.equal(torch.stack([layer[slot] for layer in layers]), chunk.kv)
    assert source.stats.tiers == ["redis"] * 3 and source.stats.read_bytes["redis"] == sum(
        chunk.kv.numel() * chunk.kv.element_size() for chunk in chunks)
    tier.close()


@pytest.mark.parametrize("admit_after", [1, 2])
def test_a_chunk_read_from_redis_is_promoted_to_the_cpu_tier_and_then_never_reads_redis(redis_prefix,
                                                                                        admit_after):
    redis_tier = RedisTier(REDIS_URL, redis_prefix, connections=2)
    cpu = MemoryTier("cpu")
    writer = ChunkStore(TieredStore([redis_tier], [None]))  # another replica wrote it: Redis only
    chunks = [make_chunk(seed, n_layers=3) for seed in range(2)]
    keys = [key_of(chunk) for chunk in chunks]
    for key, chunk in zip(keys, chunks):
        assert writer.put(key, chunk)
    store = ChunkStore(TieredStore([cpu, redis_tier], [1 << 30, None], admit_after=admit_after))

    def use() -> list[str | None]:
        with StoreSource(store, keys) as source:
            layers = [source.layer(i) for i in range(3)]
        for slot, chunk in enumerate(chunks):
            assert torch.equal(torch.stack([layer[slot] for layer in layers]), chunk.kv)
        return source.stats.tiers

    # Admission: a chunk enters the CPU tier on its `admit_after`-th use, read from Redis until then.
    for _ in range(admit_after):
        assert use() == ["redis", "redis"]
    assert all(cpu.contains(layer_key(key, layer)) for key in keys for layer in range(3))
    redis_hits = store.tiered.counters()["redis"].hits
    assert use() == ["cpu", "cpu"]
    assert use() == ["cpu", "cpu"]
    assert store.tiered.counters()["redis"].hits == redis_hits  # not one entry read from Redis again
    assert store.tiered.counters()["cpu"].promotions == 2 * (3 + 1)  # every layer and the manifest
    redis_tier.close()


def test_before_admission_a_one_off_chunk_stays_out_of_the_cpu_tier(redis_prefix):
    redis_tier = RedisTier(REDIS_URL, redis_prefix, connections=2)
    cpu = MemoryTier("cpu")
    chunk = make_chunk(5, n_layers=2)
    ChunkStore(TieredStore([redis_tier], [None])).put(key_of(chunk), chunk)
    store = ChunkStore(TieredStore([cpu, redis_tier], [1 << 30, None], admit_after=2))
    with StoreSource(store, [key_of(chunk)]) as source:
        source.layer(0), source.layer(1)
    assert source.stats.tiers == ["redis"] and cpu.bytes_used() == 0
    redis_tier.close()


def test_a_refused_get_in_a_batch_leaves_the_connection_in_step(redis_prefix, client, caplog):
    tier = RedisTier(REDIS_URL, redis_prefix, connections=1)
    tier.put("k:0", block(0))
    tier.put("k:2", block(2))
    client.hset(redis_prefix + "k:1", "field", "not a string")  # GET answers WRONGTYPE
    with caplog.at_level(logging.WARNING, logger="store"):
        assert tier.get_many(["k:0", "k:1", "k:2"]) == [None, None, None]  # a refusal: the batch misses
    assert "refused" in caplog.text and tier.available
    found = tier.get_many(["k:2", "k:0"])
    assert torch.equal(found[0], block(2)) and torch.equal(found[1], block(0))
    tier.close()
