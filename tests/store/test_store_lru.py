"""LRU by bytes in one place: exact eviction order, demotion down, promotion up, admission."""

import logging

import torch
from tests.helpers.kv import block

from store.codec import encode
from store.config import StoreConfig
from store.disk_tier import DiskTier
from store.memory_tier import MemoryTier
from store.open import open_tiered
from store.tiered import TieredStore

ENTRY = block(0)  # every entry in these tests has this size
SIZE = ENTRY.numel() * ENTRY.element_size()
ENCODED = len(encode(ENTRY))


def put_all(store: TieredStore, keys: str) -> None:
    for seed, key in enumerate(keys):
        assert store.put(key, block(seed))


def held(tier) -> set[str]:
    return {key for key, _ in tier.entries()}


def test_budget_for_three_evicts_exactly_the_least_recently_used_into_the_tier_below(tmp_path):
    cpu, disk = MemoryTier("cpu"), DiskTier(tmp_path)
    store = TieredStore([cpu, disk], [3 * SIZE, None])
    put_all(store, "abc")
    assert held(cpu) == {"a", "b", "c"} and held(disk) == set()
    assert torch.equal(store.get("a"), block(0))  # recency now: b, c, a
    store.put("d", block(3))
    assert held(cpu) == {"c", "a", "d"} and held(disk) == {"b"}
    store.put("e", block(4))
    assert held(cpu) == {"a", "d", "e"} and held(disk) == {"b", "c"}
    assert torch.equal(disk.get("b"), block(1)) and torch.equal(disk.get("c"), block(2))
    stats = store.stats()
    assert (stats["cpu"].evictions, stats["disk"].demotions) == (2, 2)
    assert stats["cpu"].bytes == 3 * SIZE == cpu.bytes_used()


def test_a_hit_below_is_promoted_and_pushes_out_the_least_recently_used(tmp_path):
    cpu, disk = MemoryTier("cpu"), DiskTier(tmp_path)
    store = TieredStore([cpu, disk], [2 * SIZE, None])
    put_all(store, "abc")  # a was demoted
    store.note_use("a")  # a is used more often than b, the least recently used: it takes b's place
    assert torch.equal(store.get("a"), block(0))
    assert held(cpu) == {"c", "a"} and held(disk) == {"a", "b"}  # inclusive: disk keeps its copy
    stats = store.stats()
    assert (stats["cpu"].promotions, stats["disk"].hits, stats["cpu"].misses) == (1, 1, 1)
    assert stats["disk"].demotions == 2  # a when c came in, b when a came back


def test_a_hit_below_does_not_push_out_a_chunk_used_as_often(tmp_path):
    cpu, disk = MemoryTier("cpu"), DiskTier(tmp_path)
    store = TieredStore([cpu, disk], [2 * SIZE, None])
    put_all(store, "abc")  # a was demoted
    for key in "abc":
        store.note_use(key)
    assert torch.equal(store.get("a"), block(0))  # served from below, not promoted
    assert held(cpu) == {"b", "c"} and store.stats()["cpu"].promotions == 0


def test_a_request_larger_than_the_tier_leaves_whole_chunks_in_it(tmp_path):
    """Four chunks of four layers, room for two chunks in the CPU tier: requests read every chunk
    layer by layer. The tier keeps two whole chunks (read at its speed), instead of promotion on every
    hit leaving layer slices of all four there, which makes every chunk read at the slow tier's speed."""
    cpu, disk = MemoryTier("cpu"), DiskTier(tmp_path)
    store = TieredStore([cpu, disk], [8 * SIZE, None])
    chunks = ["c0", "c1", "c2", "c3"]
    for seed, chunk in enumerate(chunks):
        for layer in range(4):
            assert store.put(f"{chunk}:{layer}", block(seed))
    for _ in range(3):
        for chunk in chunks:
            store.note_use(chunk)
        for layer in range(4):
            for chunk in chunks:
                assert store.get(f"{chunk}:{layer}") is not None
    tiers = [store.slowest([f"{chunk}:{layer}" for layer in range(4)]) for chunk in chunks]
    assert tiers == ["disk", "disk", "cpu", "cpu"]


def test_the_bottom_tier_drops_its_least_recently_used(tmp_path):
    cpu, disk = MemoryTier("cpu"), DiskTier(tmp_path)
    store = TieredStore([cpu, disk], [1 * SIZE, 2 * ENCODED])
    put_all(store, "abcd")  # cpu: d; disk got a, b, c and dropped a
    assert held(cpu) == {"d"} and held(disk) == {"b", "c"}
    assert store.get("a") is None
    assert store.stats()["disk"].evictions == 1


def test_three_tiers_cascade(tmp_path):
    top, middle, bottom = MemoryTier("gpu-like"), MemoryTier("cpu"), DiskTier(tmp_path)
    store = TieredStore([top, middle, bottom], [1 * SIZE, 1 * SIZE, None])
    put_all(store, "abc")
    assert (held(top), held(middle), held(bottom)) == ({"c"}, {"b"}, {"a"})


def test_an_entry_larger_than_a_budget_passes_through(tmp_path):
    cpu, disk = MemoryTier("cpu"), DiskTier(tmp_path)
    store = TieredStore([cpu, disk], [SIZE // 2, None])
    assert store.put("big", ENTRY)
    assert held(cpu) == set() and held(disk) == {"big"} and torch.equal(store.get("big"), ENTRY)


def use(store: TieredStore, key: str, seed: int) -> bool:
    """One request for `key`: count the use, read it, write it on a miss. True on a fast-tier hit."""
    store.note_use(key)
    fast_hit = store.tiers[0].contains(key)
    if store.get(key) is None:
        store.put(key, block(seed))
    return fast_hit


def flood_after_hot_use(tmp_path, admit_after: int) -> TieredStore:
    store = TieredStore([MemoryTier("cpu"), DiskTier(tmp_path)], [4 * SIZE, None], admit_after=admit_after)
    for _ in range(3):
        for seed, key in enumerate(["h0", "h1", "h2", "h3"]):
            use(store, key, seed)
    for seed in range(20):
        use(store, f"once{seed}", 100 + seed)
    return store


def test_admission_keeps_a_flood_of_one_off_chunks_out_of_memory(tmp_path):
    store = flood_after_hot_use(tmp_path / "admit", admit_after=2)
    assert held(store.tiers[0]) == {"h0", "h1", "h2", "h3"}
    assert {f"once{seed}" for seed in range(20)} <= held(store.tiers[1])  # stored all the same


def test_without_admission_the_same_flood_flushes_the_hot_chunks(tmp_path):
    store = flood_after_hot_use(tmp_path / "lru", admit_after=1)
    assert held(store.tiers[0]).isdisjoint({"h0", "h1", "h2", "h3"})


def test_the_last_tier_admits_on_first_use_so_nothing_is_lost():
    cpu = MemoryTier("cpu")
    store = TieredStore([cpu], [4 * SIZE], admit_after=2)
    assert store.put("new", ENTRY) and held(cpu) == {"new"}


def test_gpu_tier_is_used_when_cuda_is_present_and_left_out_with_a_log_line_when_not(caplog):
    with caplog.at_level(logging.INFO, logger="store"):
        store = open_tiered(StoreConfig(gpu_bytes=10 * SIZE, cpu_bytes=10 * SIZE, admit_after=1))
    names = [tier.name for tier in store.tiers]
    if not torch.cuda.is_available():
        assert names == ["cpu"] and "CUDA is not available" in caplog.text
        return
    assert names == ["gpu", "cpu"]
    store.put("a", ENTRY)
    assert store.get("a").is_cuda and torch.equal(store.get("a").cpu(), ENTRY)


def test_written_through_a_put_the_fast_tier_takes_also_lands_in_the_bottom_tier(tmp_path):
    cpu, disk = MemoryTier("cpu"), DiskTier(tmp_path)
    plain = TieredStore([MemoryTier("cpu"), DiskTier(tmp_path / "plain")], [4 * SIZE, None])
    put_all(plain, "ab")
    assert held(plain.tiers[1]) == set()  # without it, the bottom tier sees only demotions
    store = TieredStore([cpu, disk], [4 * SIZE, None], write_through=True)
    put_all(store, "ab")
    assert held(cpu) == {"a", "b"} and held(disk) == {"a", "b"}
    assert torch.equal(disk.get("b"), block(1))


def test_a_chunk_that_fits_the_cpu_tiers_free_room_gets_a_copy_there_on_its_put_and_stays_where_admission_puts_it(
        tmp_path):
    """Admission (second use) decides what the CPU tier evicts, not what fills its free room: an ingested chunk that
    fits is read from the CPU tier from its first use, and disk keeps it (across restarts). A chunk that does not
    fit the room left gets no copy at all (not some of its layers), and nothing is evicted for one."""
    from blend.cache import ChunkKV
    from store.chunks import ChunkStore, Manifest
    from store.keys import chunk_key, layer_key, manifest_key

    def chunk(seed: int) -> ChunkKV:
        g = torch.Generator().manual_seed(seed)
        return ChunkKV(token_ids=tuple(range(seed, seed + 4)), start=3, kv=torch.randn(3, 4, 2, 2, 8, generator=g))

    chunks = [chunk(seed) for seed in range(3)]
    keys = [chunk_key("fp", [], c.token_ids, c.kv.dtype) for c in chunks]
    described = Manifest.of(chunks[0]).to_tensor()
    size = chunks[0].kv.numel() * chunks[0].kv.element_size() + described.numel() * described.element_size()
    cpu, disk = MemoryTier("cpu"), DiskTier(tmp_path)
    store = ChunkStore(TieredStore([cpu, disk], [int(1.5 * size), None], admit_after=2))  # room for one and a half
    for key, value in zip(keys, chunks):
        assert store.put(key, value)
    entries = [[manifest_key(key)] + [layer_key(key, i) for i in range(3)] for key in keys]
    assert set(entries[0]) <= held(cpu)  # the first fits the free room: copied there
    assert not set(entries[1]) & held(cpu) and not set(entries[2]) & held(cpu)  # no room left for a whole one
    assert all(set(e) <= held(disk) for e in entries)  # every chunk where admission puts it
    assert store.tiered.stats()["cpu"].evictions == 0
    source_tiers = [store.tiered.slowest([layer_key(key, i) for i in range(3)]) for key in keys]
    assert source_tiers == ["cpu", "disk", "disk"]


def test_the_room_copy_is_all_or_none_and_skips_a_tier_that_already_holds_the_chunk(tmp_path):
    """`copy_into_room`: where admission already put the chunk in the memory tier (admit on first use) nothing is
    copied again; a chunk larger than the room left is not copied at all, and nothing is evicted for it."""
    from blend.cache import ChunkKV
    from store.chunks import ChunkStore
    from store.keys import chunk_key

    chunks = [ChunkKV(token_ids=(seed, 5), start=2, kv=torch.full((2, 2, 2, 2, 8), float(seed))) for seed in range(3)]
    keys = [chunk_key("fp", [], c.token_ids, c.kv.dtype) for c in chunks]
    cpu, disk = MemoryTier("cpu"), DiskTier(tmp_path)
    store = ChunkStore(TieredStore([cpu, disk], [1 << 20, None], admit_after=1))
    assert store.put(keys[0], chunks[0])
    one = store.tiered.usage()["cpu"]
    assert not held(disk) and one > 0  # admitted on first use: in the CPU tier once, not twice
    tiered = store.tiered
    big = [(f"{keys[1]}:{i}", torch.zeros(1 << 17)) for i in range(3)]  # 1.5 MiB: more than the room left
    assert tiered.copy_into_room(big) is None and tiered.usage()["cpu"] == one
    assert tiered.stats()["cpu"].evictions == 0


def test_a_room_copy_that_runs_out_of_room_midway_takes_its_entries_out_again():
    """Another thread's put may take the room between the check and the copy: the entry that goes over the budget is
    not kept and the chunk's entries copied before it are taken out, so no chunk is left split and nothing evicted."""

    class Filling(MemoryTier):  # its last put lands after a concurrent put filled the room
        def put(self, key, value):
            size = super().put(key, value)
            return size + (1 << 20) if key.endswith(":m") else size

    cpu = Filling("cpu")
    tiered = TieredStore([cpu, MemoryTier("below")], [1 << 19, None], admit_after=1)
    assert tiered.put("old:0", torch.zeros(16))  # an entry of another chunk, which must stay
    entries = [(f"new:{i}", torch.ones(64)) for i in range(3)] + [("new:m", torch.ones(4))]
    assert tiered.copy_into_room(entries) is None
    assert held(cpu) == {"old:0"} and tiered.stats()["cpu"].evictions == 0
