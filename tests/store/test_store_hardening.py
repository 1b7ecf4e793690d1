"""Issue 19, items 4 and 5: a forged or copied Redis/disk entry is a miss, never an answer (keyed MAC);
a disk-tier OS error is a miss plus a counted error, and repeated errors mark the tier unavailable."""

import logging

import pytest
import redis
import torch
from tests.helpers.kv import REDIS_URL, make_chunk, stored_prompt

from blend.fusor import BlendConfig, MemorySource, compute_kv, prefill
from store import codec
from store.chunks import ChunkStore
from store.config import StoreConfig
from store.disk_tier import ERRORS_BEFORE_DOWN, DiskTier
from store.keys import chunk_key, layer_key
from store.redis_tier import RedisTier
from store.source import StoreSource
from store.tiered import TieredStore

SECRET = b"test-secret-0123456789abcdef"
CONFIG = BlendConfig(mode="blend", ratio=0.3)


def key_of(chunk) -> str:
    return chunk_key("fp", [], chunk.token_ids, chunk.kv.dtype)


class Raw:
    """Read and write a tier's stored bytes behind its back, as an attacker with access to it would."""

    def __init__(self, kind: str, tier, client: redis.Redis | None = None):
        self.kind, self.tier, self.client = kind, tier, client

    def get(self, key: str) -> bytes:
        if self.kind == "redis":
            return self.client.get(self.tier.prefix + key)
        return self.tier._path(key).read_bytes()

    def set(self, key: str, value: bytes) -> None:
        if self.kind == "redis":
            self.client.set(self.tier.prefix + key, value)
        else:
            self.tier._path(key).write_bytes(value)


@pytest.fixture(params=["redis", "disk"])
def open_tier(request, tmp_path):
    """A function (secret) -> (tier, Raw access to its bytes); Redis under the test's own prefix."""
    client = None
    if request.param == "redis":
        prefix = request.getfixturevalue("redis_prefix")
        client = redis.Redis.from_url(REDIS_URL)
        request.addfinalizer(client.close)

    def open_(secret):
        tier = (RedisTier(REDIS_URL, prefix, secret=secret) if request.param == "redis"
                else DiskTier(tmp_path, secret=secret))
        return tier, Raw(request.param, tier, client)

    return open_


# -- item 4: forged entries --------------------------------------------------------------------------


def test_a_layer_of_chunk_a_written_under_chunk_b_is_corrupt_with_a_secret(open_tier):
    tier, raw = open_tier(SECRET)
    store = ChunkStore(TieredStore([tier], [None]))
    a, b = make_chunk(1), make_chunk(2)  # same shapes: only the MAC tells the copy apart
    assert store.put(key_of(a), a) and store.put(key_of(b), b)
    raw.set(layer_key(key_of(b), 1), raw.get(layer_key(key_of(a), 1)))
    assert store.get(key_of(b)) is None
    assert store.tiered.stats()[tier.name].corrupt == 1
    assert not tier.contains(layer_key(key_of(b), 1))  # deleted, so the caller's recompute replaces it
    assert torch.equal(store.get(key_of(a)).kv, a.kv)


def test_without_a_secret_the_copy_is_read_as_today(open_tier):
    """Why the MAC is needed: the crc of a copied value is valid, so without a secret it is an answer."""
    tier, raw = open_tier(None)
    store = ChunkStore(TieredStore([tier], [None]))
    a, b = make_chunk(1), make_chunk(2)
    store.put(key_of(a), a)
    store.put(key_of(b), b)
    raw.set(layer_key(key_of(b), 1), raw.get(layer_key(key_of(a), 1)))
    assert torch.equal(store.get(key_of(b)).kv[1], a.kv[1])


def test_entries_without_a_mac_or_with_another_secret_are_misses_once_a_secret_is_set(open_tier):
    old, _ = open_tier(None)
    chunk = make_chunk(3)
    ChunkStore(TieredStore([old], [None])).put(key_of(chunk), chunk)
    for secret in (SECRET, b"another-secret-0123456789"):
        tier, _ = open_tier(secret)
        store = ChunkStore(TieredStore([tier], [None]))
        assert store.get(key_of(chunk)) is None and store.tiered.stats()[tier.name].corrupt == 1
        ChunkStore(TieredStore([old], [None])).put(key_of(chunk), chunk)  # the miss deleted it
    tier, _ = open_tier(SECRET)
    store = ChunkStore(TieredStore([tier], [None]))
    assert store.get_or_compute([key_of(chunk)], lambda index: chunk)[0].kv.equal(chunk.kv)
    assert torch.equal(store.get(key_of(chunk)).kv, chunk.kv)  # rewritten with a MAC, now a hit


def test_the_mac_binds_the_value_to_its_entry_key_and_secret():
    value = make_chunk(4).kv[0]
    data = codec.encode(value, secret=SECRET, key="a:0")
    assert torch.equal(codec.decode(data, SECRET, "a:0"), value)
    assert torch.equal(codec.decode(data), value)  # no secret: the crc is checked, as before
    for secret, key in ((SECRET, "a:1"), (b"other-secret-0123456789", "a:0")):
        with pytest.raises(codec.CorruptEntry, match="MAC"):
            codec.decode(data, secret, key)
    flipped = bytearray(data)
    flipped[-1] ^= 1
    with pytest.raises(codec.CorruptEntry, match="MAC"):
        codec.decode(bytes(flipped), SECRET, "a:0")


def layout_and_entries(step):
    # Chunks 1 and 2 have the same length, so chunk 1's layers fit chunk 2's manifest.
    return stored_prompt(step, 5, (12, 12, 9))


def blend_through_store(step, layout, entries, store, keys):
    calls = []

    def compute(index):
        calls.append(index)
        return compute_kv(step, layout.chunks[index - 1], behind=entries[0])

    with torch.inference_mode(), StoreSource(store, keys, compute) as source:
        return prefill(step, layout, CONFIG, source), calls


@pytest.mark.parametrize("secret", [SECRET, None], ids=["secret", "no-secret"])
def test_a_forged_chunk_gives_the_honest_answer_with_a_secret(tiny, open_tier, secret):
    layout, entries, keys = layout_and_entries(tiny)
    tier, raw = open_tier(secret)
    store = ChunkStore(TieredStore([tier], [None]))
    for key, entry in zip(keys, entries):
        store.put(key, entry)
    for layer in range(entries[1].kv.shape[0]):  # chunk 1's K/V under chunk 2's keys, every layer
        raw.set(layer_key(keys[2], layer), raw.get(layer_key(keys[1], layer)))
    with torch.inference_mode():
        honest = prefill(tiny, layout, CONFIG, MemorySource(entries))
    got, calls = blend_through_store(tiny, layout, entries, store, keys)
    if secret is None:  # the attack works without the MAC: the test is able to fail
        assert calls == [] and not torch.allclose(got.logits, honest.logits)
        return
    assert calls == [2]
    assert torch.equal(got.logits, honest.logits)
    # The forged layers read before the chunk was recomputed: the first, and those the prefetch thread had read ahead
    # (it recomputes nothing: the model thread does, `StoreSource._read_slow`); the rest recomputed over.
    assert 1 <= store.tiered.stats()[tier.name].corrupt <= 1 + StoreSource(store, []).depth
    again, calls = blend_through_store(tiny, layout, entries, store, keys)
    assert calls == [] and torch.equal(again.logits, honest.logits)


def test_start_up_without_a_secret_says_the_shared_tiers_are_trusted(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="store"):
        ChunkStore.from_config(StoreConfig(cpu_bytes=1 << 20, disk_path=tmp_path / "a"))
    assert "trusted as is" in caplog.text and "disk" in caplog.text
    caplog.clear()
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET.decode() + "\n")
    config = StoreConfig(cpu_bytes=1 << 20, disk_path=tmp_path / "b", secret_file=secret_file)
    with caplog.at_level(logging.INFO, logger="store"):
        store = ChunkStore.from_config(config)
    assert "trusted" not in caplog.text and SECRET.decode() not in caplog.text
    assert store.tiered.tiers[1]._secret == SECRET
    assert SECRET.decode() not in repr(StoreConfig(cpu_bytes=1, secret=SECRET.decode()))
    with pytest.raises(ValueError, match="shorter than 16"):
        StoreConfig(cpu_bytes=1, secret="short")


# -- item 5: disk OS errors ---------------------------------------------------------------------------


def put_and_block_layer(tmp_path, layer: int = 1):
    """A disk store holding one chunk whose layer file has been replaced by a directory (EISDIR)."""
    tier = DiskTier(tmp_path)
    store = ChunkStore(TieredStore([tier], [None]))
    chunk = make_chunk(5)
    assert store.put(key_of(chunk), chunk)
    path = tier._path(layer_key(key_of(chunk), layer))
    path.unlink()
    path.mkdir()
    return tier, store, chunk


def test_a_directory_in_place_of_a_layer_file_is_a_miss_and_a_counted_error(tmp_path, caplog):
    tier, store, chunk = put_and_block_layer(tmp_path)
    with caplog.at_level(logging.WARNING, logger="store"):
        assert store.get(key_of(chunk)) is None
    assert tier.errors == 1 and tier.available
    assert "Is a directory" in caplog.text  # the log has the path; no exception carries it to a client
    got = store.get_or_compute([key_of(chunk)], lambda index: chunk)  # recomputed; its write-back fails
    assert torch.equal(got[0].kv, chunk.kv) and tier.skipped_writes == 1 and tier.errors >= 2


def test_repeated_disk_errors_mark_the_tier_unavailable_until_a_check_succeeds(tmp_path):
    tier, store, chunk = put_and_block_layer(tmp_path)
    key = layer_key(key_of(chunk), 1)
    for _ in range(ERRORS_BEFORE_DOWN - 1):
        assert store.tiered.get(key) is None
    assert tier.available
    assert store.tiered.get(key) is None
    assert not tier.available and tier.errors == ERRORS_BEFORE_DOWN
    assert tier.check() and tier.available  # the folder itself is fine
    assert torch.equal(store.tiered.get(layer_key(key_of(chunk), 0)), chunk.kv[0])


def test_a_blocked_layer_file_under_the_fusor_gives_the_honest_answer(tiny, tmp_path):
    layout, entries, keys = layout_and_entries(tiny)
    tier = DiskTier(tmp_path)
    store = ChunkStore(TieredStore([tier], [None]))
    for key, entry in zip(keys, entries):
        store.put(key, entry)
    path = tier._path(layer_key(keys[3], 1))
    path.unlink()
    path.mkdir()
    with torch.inference_mode():
        honest = prefill(tiny, layout, CONFIG, MemorySource(entries))
    got, calls = blend_through_store(tiny, layout, entries, store, keys)
    assert calls == [3] and torch.equal(got.logits, honest.logits) and tier.errors >= 1
