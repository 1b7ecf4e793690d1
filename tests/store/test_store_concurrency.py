"""Concurrent writers of one chunk, from threads and from processes, leave exactly one valid entry."""

import multiprocessing
import threading

import pytest
import torch
from tests.helpers.kv import REDIS_URL, make_chunk

from store.chunks import ChunkStore
from store.disk_tier import DiskTier
from store.keys import chunk_key
from store.memory_tier import MemoryTier
from store.redis_tier import RedisTier
from store.tiered import TieredStore

CHUNK_SEED = 11
ROUNDS = 20


def the_chunk():
    return make_chunk(CHUNK_SEED, n_layers=4, tokens=16)


def the_key(chunk) -> str:
    return chunk_key("fp", [9], chunk.token_ids, chunk.kv.dtype)


def write_many(stores, barrier) -> None:
    chunk = the_chunk()
    barrier.wait()
    for _ in range(ROUNDS):
        for store in stores:
            assert store.put(the_key(chunk), chunk)


def assert_one_valid_entry(tier, chunk) -> None:
    key = the_key(chunk)
    expected = {f"{key}:m", *(f"{key}:{layer}" for layer in range(chunk.kv.shape[0]))}
    entries = dict(tier.entries())
    assert set(entries) == expected
    reader = ChunkStore(TieredStore([tier], [None]))
    out = reader.get(key)
    assert out is not None and torch.equal(out.kv, chunk.kv) and out.token_ids == chunk.token_ids
    if isinstance(tier, DiskTier):  # no temporary file left behind
        assert sorted(path.name for path in tier.root.glob("*/*")) == sorted(expected)


def tier_of(kind, tmp_path, prefix):
    return {"cpu": lambda: MemoryTier("cpu"), "disk": lambda: DiskTier(tmp_path),
            "redis": lambda: RedisTier(REDIS_URL, prefix)}[kind]()


@pytest.mark.parametrize("kind", ["cpu", "disk", "redis"])
def test_threads_writing_one_chunk_leave_one_valid_entry(kind, tmp_path, redis_prefix):
    tier = tier_of(kind, tmp_path, redis_prefix)
    store = ChunkStore(TieredStore([tier], [None]))
    barrier = threading.Barrier(6)
    threads = [threading.Thread(target=write_many, args=([store], barrier)) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert_one_valid_entry(tier, the_chunk())
    sizes = dict(tier.entries())
    assert tier.bytes_used() == sum(sizes.values())  # counted once, not once per writer


def test_threads_under_a_budget_keep_the_byte_count_true(tmp_path):
    cpu, disk = MemoryTier("cpu"), DiskTier(tmp_path)
    store = TieredStore([cpu, disk], [3000, None])
    chunks = ChunkStore(store)

    def write(seed):
        for round_ in range(5):
            chunk = make_chunk(seed * 10 + round_ % 2, n_layers=2, tokens=8)
            chunks.put(chunk_key("fp", [], chunk.token_ids, chunk.kv.dtype), chunk)

    threads = [threading.Thread(target=write, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store._used[0] == cpu.bytes_used() <= 3000
    for seed in range(4):
        for variant in range(2):
            chunk = make_chunk(seed * 10 + variant, n_layers=2, tokens=8)
            out = chunks.get(chunk_key("fp", [], chunk.token_ids, chunk.kv.dtype))
            assert out is not None and torch.equal(out.kv, chunk.kv)  # nothing lost on the way down


def _process_writer(root, prefix, barrier) -> None:
    stores = [ChunkStore(TieredStore([DiskTier(root)], [None])),
              ChunkStore(TieredStore([RedisTier(REDIS_URL, prefix)], [None]))]
    write_many(stores, barrier)


def test_two_processes_writing_one_chunk_leave_one_valid_entry(tmp_path, redis_prefix):
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    processes = [context.Process(target=_process_writer, args=(tmp_path, redis_prefix, barrier))
                 for _ in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    assert [process.exitcode for process in processes] == [0, 0]
    assert_one_valid_entry(DiskTier(tmp_path), the_chunk())
    assert_one_valid_entry(RedisTier(REDIS_URL, redis_prefix), the_chunk())
