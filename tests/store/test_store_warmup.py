"""The warm-up's pass: chunks copied from the shared bottom tier into free room of the CPU tier, within its
budgets, never raising on a Redis outage; a replica's offers never evict, a request's push out only colder
chunks."""

from __future__ import annotations

import hashlib

import torch
from tests.helpers.kv import make_chunk

from store.chunks import ChunkStore
from store.keys import layer_key, manifest_key
from store.memory_tier import MemoryTier
from store.redis_tier import RedisTier
from store.tiered import TieredStore
from store.warmup import Warmup

N_LAYERS = 3


def key_of(seed: int) -> str:
    return hashlib.sha256(str(seed).encode()).hexdigest()


def chunk_bytes() -> int:
    chunk = make_chunk(0, N_LAYERS)
    manifest = 8 * (5 + len(chunk.token_ids))  # int64 head + token ids
    return chunk.kv.numel() * chunk.kv.element_size() + manifest


def shared_store(cpu_bytes: int, bottom=None) -> tuple[TieredStore, MemoryTier]:
    """A replica's store: a CPU tier over a shared bottom tier (a memory tier standing in for Redis)."""
    bottom = bottom if bottom is not None else MemoryTier("redis")
    return TieredStore([MemoryTier("cpu"), bottom], [cpu_bytes, None], admit_after=2), bottom


def ingest_elsewhere(bottom, seeds) -> list[str]:
    """What another replica's write-through leaves in the shared tier: every layer, then the manifest."""
    writer = ChunkStore(TieredStore([bottom], [None]))
    keys = [key_of(seed) for seed in seeds]
    for seed, key in zip(seeds, keys):
        assert writer.put(key, make_chunk(seed, N_LAYERS))
    return keys


def in_cpu(tiered: TieredStore, key: str) -> bool:
    cpu = tiered.tiers[0]
    return cpu.contains(manifest_key(key)) and all(cpu.contains(layer_key(key, i)) for i in range(N_LAYERS))


def test_a_pass_pulls_offered_chunks_into_the_cpu_tier_and_a_read_is_then_a_cpu_hit():
    tiered, bottom = shared_store(10 * chunk_bytes())
    keys = ingest_elsewhere(bottom, [1, 2])
    warmup = Warmup(tiered, "cpu")
    warmup.offer(keys)
    assert warmup.stats().queue == 2
    assert warmup.run_pass() == 2 * chunk_bytes()
    stats = warmup.stats()
    assert (stats.queue, stats.chunks, stats.bytes, stats.misses) == (0, 2, 2 * chunk_bytes(), 0)
    store = ChunkStore(tiered)
    # Admission wants 2 uses before a chunk enters the CPU tier; the warm-up filled free room without it.
    got = store.get(keys[0])
    assert torch.equal(got.kv, make_chunk(1, N_LAYERS).kv)
    assert tiered.slowest([layer_key(keys[0], i) for i in range(N_LAYERS)]) == "cpu"
    assert tiered.counters()["redis"].hits == 0


def test_a_pass_stops_at_its_byte_budget_and_the_rest_waits_for_the_next():
    tiered, bottom = shared_store(10 * chunk_bytes())
    keys = ingest_elsewhere(bottom, [1, 2, 3, 4, 5])
    warmup = Warmup(tiered, "cpu", pass_bytes=2 * chunk_bytes())
    warmup.offer(keys)
    assert warmup.run_pass() == 2 * chunk_bytes()
    assert [in_cpu(tiered, key) for key in keys] == [True, True, False, False, False]
    assert warmup.stats().queue == 3
    warmup.run_pass()
    warmup.run_pass()
    assert all(in_cpu(tiered, key) for key in keys) and warmup.stats().chunks == 5


def test_a_pass_only_fills_free_room_never_evicting_and_stops_at_the_tier_cap():
    tiered, bottom = shared_store(3 * chunk_bytes())
    used = ingest_elsewhere(bottom, [9])[0]
    promote(tiered, used)
    assert in_cpu(tiered, used)
    keys = ingest_elsewhere(bottom, [1, 2, 3, 4])
    warmup = Warmup(tiered, "cpu")
    warmup.offer(keys)
    warmup.run_pass()
    assert in_cpu(tiered, used)  # the request's chunk stays
    assert [in_cpu(tiered, key) for key in keys] == [True, True, False, False]
    assert tiered.counters()["cpu"].evictions == 0
    assert tiered.usage()["cpu"] <= 3 * chunk_bytes()
    assert warmup.stats().queue == 2  # waiting for room, not dropped


def promote(tiered: TieredStore, key: str) -> None:
    """What requests do: two uses admit the chunk, a read promotes it into the CPU tier."""
    tiered.note_use(key)
    tiered.note_use(key)
    ChunkStore(tiered).get(key)


def test_warmed_entries_are_the_first_evicted_when_a_request_needs_room():
    tiered, bottom = shared_store(3 * chunk_bytes())
    first, second = ingest_elsewhere(bottom, [8, 9])
    promote(tiered, first)  # used by a request before the warm-up ran: older than the warmed entries
    warmed = ingest_elsewhere(bottom, [1, 2])
    warmup = Warmup(tiered, "cpu")
    warmup.offer(warmed)
    warmup.run_pass()
    assert all(in_cpu(tiered, key) for key in [first, *warmed])
    promote(tiered, second)  # needs one chunk's room: taken from the warmed entries, not from `first`
    assert in_cpu(tiered, first) and in_cpu(tiered, second)
    assert sum(in_cpu(tiered, key) for key in warmed) == 1


def test_chunks_already_in_the_cpu_tier_are_skipped():
    tiered, bottom = shared_store(10 * chunk_bytes())
    keys = ingest_elsewhere(bottom, [1, 2])
    warmup = Warmup(tiered, "cpu")
    warmup.offer(keys[:1])
    warmup.run_pass()
    warmup.offer(keys)
    assert warmup.run_pass() == chunk_bytes()
    stats = warmup.stats()
    assert (stats.chunks, stats.skipped, stats.queue) == (2, 1, 0)


def test_a_chunk_missing_from_the_shared_tier_is_a_counted_miss_and_leaves_nothing_behind():
    tiered, bottom = shared_store(10 * chunk_bytes())
    keys = ingest_elsewhere(bottom, [1, 2])
    bottom.delete(manifest_key(keys[0]))  # deleted elsewhere since
    bottom.delete(layer_key(keys[1], 2))  # one layer evicted by Redis: the chunk is not pulled half
    warmup = Warmup(tiered, "cpu")
    warmup.offer(keys)
    assert warmup.run_pass() == 0
    stats = warmup.stats()
    assert (stats.chunks, stats.misses, stats.queue) == (0, 2, 0)
    assert tiered.usage()["cpu"] == 0 and not any(tiered.tiers[0].contains(e) for e, _ in bottom.entries())


def test_a_pass_stops_while_requests_wait():
    tiered, bottom = shared_store(10 * chunk_bytes())
    keys = ingest_elsewhere(bottom, [1, 2])
    waiting = [True]
    warmup = Warmup(tiered, "cpu", busy=lambda: waiting[0])
    warmup.offer(keys)
    assert warmup.run_pass() == 0 and warmup.stats().queue == 2
    waiting[0] = False
    assert warmup.run_pass() == 2 * chunk_bytes()


def test_a_redis_outage_is_a_counted_miss_never_an_error(redis_server):
    shared = RedisTier(redis_server.url, "kvblend-test:", timeout_s=0.5, retry_s=0.0)
    tiered, _ = shared_store(10 * chunk_bytes(), shared)
    keys = ingest_elsewhere(shared, [1, 2])
    redis_server.stop()
    warmup = Warmup(tiered, "cpu")
    warmup.offer(keys)
    assert warmup.run_pass() == 0  # no exception
    stats = warmup.stats()
    assert (stats.chunks, stats.misses, stats.queue) == (0, 2, 0)
    assert tiered.usage()["cpu"] == 0


def test_a_chunk_deleted_elsewhere_is_not_pulled_and_leaves_this_replicas_tiers_only():
    tiered, bottom = shared_store(10 * chunk_bytes())
    pulled, pending = ingest_elsewhere(bottom, [1, 2])
    warmup = Warmup(tiered, "cpu")
    warmup.offer([pulled])
    warmup.run_pass()
    warmup.offer([pending])
    warmup.forget([pending])
    ChunkStore(tiered).delete_local(pulled, N_LAYERS)
    assert warmup.stats().queue == 0 and warmup.run_pass() == 0
    assert tiered.usage()["cpu"] == 0
    assert bottom.contains(manifest_key(pulled))  # the shared tier is the deleting replica's to clear


def test_a_chunk_a_request_used_pushes_out_colder_chunks_but_not_one_used_as_often():
    """The CPU tier is full of chunks no request used; a chunk a request just recomputed (offered `used`) takes
    their place, at the hot end, and they are demoted to the bottom tier (not lost); offered without `used`, or
    against chunks used as often, it waits as a replica's offer does."""
    tiered, bottom = shared_store(2 * chunk_bytes())
    cold = ingest_elsewhere(bottom, [1, 2])
    warmup = Warmup(tiered, "cpu")
    warmup.offer(cold)
    warmup.run_pass()
    assert all(in_cpu(tiered, key) for key in cold)
    hot = ingest_elsewhere(bottom, [3])[0]
    tiered.note_use(hot)
    warmup.offer([hot])  # a replica's offer: free room only
    assert warmup.run_pass() == 0 and warmup.stats().queue == 1
    warmup.offer([hot], used=True)
    assert warmup.run_pass() == chunk_bytes()
    left = [key for key in cold if in_cpu(tiered, key)]
    assert in_cpu(tiered, hot) and len(left) == 1
    assert all(bottom.contains(manifest_key(key)) for key in cold)  # demoted, still in the shared tier
    tiered.note_use(left[0])  # now used as often as the next candidate
    other = ingest_elsewhere(bottom, [4])[0]
    tiered.note_use(other)
    warmup.offer([other], used=True)
    assert warmup.run_pass() == 0 and not in_cpu(tiered, other)  # the LRU victim is used as often: it stays
