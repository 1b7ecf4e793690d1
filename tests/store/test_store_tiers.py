"""Every tier round-trips bit-exactly; a damaged Redis or disk entry is a miss, never an answer."""

import logging
import re

import pytest
import redis
import torch
from tests.helpers.kv import REDIS_URL, block, make_chunk

from store.chunks import ChunkStore
from store.config import StoreConfig
from store.disk_tier import DiskTier
from store.keys import chunk_key, layer_key
from store.memory_tier import MemoryTier
from store.redis_tier import RedisTier
from store.tiered import TieredStore

TIER_NAMES = ["cpu", "disk", "redis", "gpu"]


@pytest.fixture(params=TIER_NAMES)
def tier(request, tmp_path, redis_prefix):
    if request.param == "gpu":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        return MemoryTier("gpu", "cuda")
    return {"cpu": lambda: MemoryTier("cpu"), "disk": lambda: DiskTier(tmp_path),
            "redis": lambda: RedisTier(REDIS_URL, redis_prefix)}[request.param]()


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().cpu().contiguous().view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tier_round_trip_is_bit_exact(tier, dtype):
    value = block(5, dtype=dtype)
    value[0, 0, 0, 0] = float("-0.0")  # signed zero and subnormals survive too
    value[0, 0, 0, 1] = torch.finfo(dtype).tiny / 2
    size = tier.put("k:0", value)
    assert size is not None and size >= value.numel() * value.element_size()
    assert tier.contains("k:0") and not tier.contains("k:1")
    out = tier.get("k:0")
    assert out.dtype == dtype and torch.equal(bits(out), bits(value))
    assert tier.bytes_used() == size and dict(tier.entries()) == {"k:0": size}
    tier.delete("k:0")
    assert tier.get("k:0") is None and not tier.contains("k:0") and tier.bytes_used() == 0


def test_a_reachable_tier_says_it_is_available_and_skips_no_write(tier):
    # Health is part of the protocol: callers read it without getattr, whatever the tier.
    assert tier.check() is True and tier.available is True
    assert tier.put("k:0", block(1)) is not None and tier.skipped_writes == 0


def test_memory_tier_keeps_its_own_copy():
    tier = MemoryTier("cpu")
    value = block(6)
    tier.put("k", value)
    value.zero_()
    assert tier.get("k").abs().sum() > 0


def test_a_manifest_is_parsed_once_per_stored_tensor_and_again_once_rewritten(monkeypatch):
    """The store keeps a memory tier's parsed manifest with the very tensor it came from: asked again it
    parses nothing; a chunk written anew (a new manifest tensor) is read as written; the kept ones are bounded."""
    from store import chunks

    store = ChunkStore(TieredStore([MemoryTier("cpu")], [None]))
    key = chunk_key("fp", [], [1, 2, 3], torch.float32)
    store.put(key, make_chunk(seed=1, start=7))
    first = store.manifest(key)
    parsed = []
    real = chunks.Manifest.from_tensor
    monkeypatch.setattr(chunks.Manifest, "from_tensor", classmethod(lambda cls, t: parsed.append(t) or real(t)))
    assert store.manifest(key) is first and not parsed
    store.put(key, make_chunk(seed=1, start=40))
    assert store.manifest(key).start == 40 and len(parsed) == 1
    monkeypatch.setattr(ChunkStore, "PARSED_MAX", 2)
    for seed in range(2, 6):
        other = chunk_key("fp", [], [seed], torch.float32)
        store.put(other, make_chunk(seed=seed))
        store.manifest(other)
    assert len(store._parsed) == 2


def test_chunk_round_trip_is_bit_exact_through_each_tier_alone(tier):
    chunks = ChunkStore(TieredStore([tier], [None]))
    chunk = make_chunk(7, dtype=torch.bfloat16)
    key = chunk_key("fp", [1, 2], chunk.token_ids, chunk.kv.dtype)
    assert chunks.put(key, chunk)
    out = chunks.get(key)
    assert out.token_ids == chunk.token_ids and out.start == chunk.start
    assert torch.equal(bits(out.kv), bits(chunk.kv))


def damage(tier, key: str, how: str) -> None:
    if isinstance(tier, DiskTier):
        path = tier._path(key)
        data = bytearray(path.read_bytes())
    else:
        client = redis.Redis.from_url(REDIS_URL)
        data = bytearray(client.get(tier.prefix + key))
    if how == "flipped":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) - 7]
    if isinstance(tier, DiskTier):
        path.write_bytes(bytes(data))
    else:
        client.set(tier.prefix + key, bytes(data))


@pytest.mark.parametrize("how", ["flipped", "truncated"])
@pytest.mark.parametrize("kind", ["disk", "redis"])
def test_damaged_entry_is_a_miss_and_deleted(kind, how, tmp_path, redis_prefix, caplog):
    tier = DiskTier(tmp_path) if kind == "disk" else RedisTier(REDIS_URL, redis_prefix)
    store = TieredStore([tier], [None])
    chunks = ChunkStore(store)
    chunk = make_chunk(8)
    key = chunk_key("fp", [], chunk.token_ids, chunk.kv.dtype)
    chunks.put(key, chunk)
    damage(tier, layer_key(key, 1), how)
    with caplog.at_level(logging.WARNING, logger="store"):
        assert chunks.get(key) is None
    assert "corrupt" in caplog.text
    assert not tier.contains(layer_key(key, 1))  # deleted, so the next request recomputes and rewrites it
    assert tier.contains(layer_key(key, 0))  # the intact layers are left alone
    assert store.stats()[kind].corrupt == 1


def test_damaged_lower_copy_falls_through_to_a_miss_not_an_answer(tmp_path):
    disk = DiskTier(tmp_path)
    store = TieredStore([MemoryTier("cpu"), disk], [10**6, None])
    value = block(9)
    disk.put("k:0", value)
    damage(disk, "k:0", "flipped")
    assert store.get("k:0") is None
    assert store.stats()["disk"].corrupt == 1 and store.stats()["cpu"].promotions == 0


def test_disk_entries_survive_a_restart(tmp_path):
    value = block(10)
    DiskTier(tmp_path).put("k:0", value)
    reopened = DiskTier(tmp_path)
    assert dict(reopened.entries()).keys() == {"k:0"}
    assert torch.equal(reopened.get("k:0"), value)


def test_disk_rejects_a_key_that_is_not_a_file_name(tmp_path):
    with pytest.raises(ValueError, match=r"'\.\./x'"):
        DiskTier(tmp_path).put("../x", block(0))


@pytest.mark.parametrize("kind", ["disk", "redis"])
def test_quantize_flag_stores_int8_and_reads_back_within_half_a_step(kind, tmp_path, redis_prefix):
    config = StoreConfig(cpu_bytes=0, disk_path=tmp_path if kind == "disk" else None,
                         redis_url=REDIS_URL if kind == "redis" else None, redis_prefix=redis_prefix,
                         quantize=True)
    chunks = ChunkStore.from_config(config)
    tier = chunks.tiered.tiers[0]
    chunk = make_chunk(12, tokens=32, dim=64)
    key = chunk_key("fp", [], chunk.token_ids, chunk.kv.dtype)
    chunks.put(key, chunk)
    assert tier.bytes_used() < chunk.kv.numel() * chunk.kv.element_size() / 3
    out = chunks.get(key)
    step = chunk.kv.abs().amax(dim=-1, keepdim=True) / 127
    assert out.kv.dtype == torch.float32 and not torch.equal(out.kv, chunk.kv)
    assert ((out.kv - chunk.kv).abs() <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("field, value", [("cpu_bytes", -1), ("redis_url", "http://x"), ("admit_after", 0),
                                          ("sketch_width", 1000)])
def test_config_errors_name_the_bad_value(field, value):
    with pytest.raises(ValueError, match=re.escape(f"{field} {value!r}")):
        StoreConfig(**{field: value})


class _Counting(MemoryTier):
    """A memory tier that counts its membership look-ups."""

    def __init__(self, name):
        super().__init__(name)
        self.asked = 0

    def contains(self, key):
        self.asked += 1
        return super().contains(key)


def test_slowest_names_the_slowest_of_each_entrys_fastest_holder_and_asks_the_bottom_tier_once_it_can():
    top, middle, bottom = _Counting("gpu"), _Counting("cpu"), _Counting("redis")
    tiered = TieredStore([top, middle, bottom], [None] * 3)
    value = torch.zeros(2)
    for key in ("a", "b", "dup"):
        top.put(key, value)
    for key in ("c", "dup"):
        middle.put(key, value)
    for key in ("d", "e", "dup"):
        bottom.put(key, value)
    assert tiered.slowest(["a", "b"]) == "gpu"
    assert tiered.slowest(["a", "c", "dup"]) == "cpu"  # "dup": its fastest holder, not its slowest
    assert tiered.slowest(["c", "missing"]) == "cpu"  # an entry held nowhere is not counted
    assert tiered.slowest(["missing"]) is None and tiered.slowest([]) is None
    for tier in (top, middle, bottom):
        tier.asked = 0
    assert tiered.slowest(["d", "a", "e", "c"]) == "redis"
    assert bottom.asked == 1  # the bottom tier's first hit settles it: nothing is slower
    assert top.asked == 4 and middle.asked == 3  # each faster tier asked about what no faster one holds
