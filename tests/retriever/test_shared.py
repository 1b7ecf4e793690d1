"""The shared catalog: one record in Redis, a mirror per replica, brought up to date from the log."""

from __future__ import annotations

import logging
import uuid

import numpy as np
import pytest
import redis

from retriever.chunker import Chunk
from retriever.redis_collection import CatalogFull, CatalogUnavailable, SharedCollection
from tests.helpers.kv import REDIS_URL, RedisServer, delete_prefix

DIM = 8


def chunk(n: int) -> Chunk:
    return Chunk(id=f"{n:016x}", text=f"chunk {n} text\n\n", title=f"title {n}", doc_id=f"doc{n}",
                 position=n % 3, token_ids=tuple(range(n, n + 5)))


def vector(n: int) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    v[n % DIM] = 1.0
    return v


def add(collection: SharedCollection, numbers: list[int]) -> None:
    collection.add([chunk(n) for n in numbers], np.stack([vector(n) for n in numbers]),
                   [(chunk(n).id, f"kv-{n}") for n in numbers])


@pytest.fixture
def shared(tmp_path):
    """Two replicas' collections over one prefix on the test Redis (the prefix deleted afterwards)."""
    client = redis.Redis.from_url(REDIS_URL)
    prefix = f"kvblend-test-{uuid.uuid4().hex}:catalog:default:"
    a = SharedCollection(client, prefix, tmp_path / "a", DIM)
    b = SharedCollection(client, prefix, tmp_path / "b", DIM)
    yield a, b
    a.close()
    b.close()
    delete_prefix(client, prefix)
    client.close()


def test_a_chunk_added_through_one_replica_is_found_by_the_other_after_refresh(shared):
    a, b = shared
    add(a, [1, 2])
    assert b.refresh() and not b.stale
    stored = b.get(chunk(2).id)
    assert (stored.text, stored.title, stored.doc_id, stored.position, stored.n_tokens) == \
        ("chunk 2 text\n\n", "title 2", "doc2", 2, 5)
    assert b.kv_keys(chunk(1).id) == ["kv-1"]
    assert [hit.chunk_id for hit in b.search(vector(2)[None], 1)[0]] == [chunk(2).id]
    assert len(b) == 2


def test_a_delete_through_one_replica_removes_the_chunk_from_the_other(shared):
    a, b = shared
    add(a, [1, 2, 3])
    b.refresh()
    a.delete(chunk(2).id)
    b.refresh()
    assert chunk(2).id not in b and len(b) == 2
    assert sorted(hit.chunk_id for hit in b.search(vector(2)[None], 3)[0]) == [chunk(1).id, chunk(3).id]


def test_a_restarted_replica_replays_only_what_it_missed_and_a_lost_mirror_is_rebuilt(shared, tmp_path):
    a, b = shared
    add(a, [1])
    b.refresh()
    b.close()
    add(a, [2, 3])
    a.delete(chunk(1).id)
    reopened = SharedCollection(a.client, a.prefix, tmp_path / "b", DIM)  # same mirror folder and cursor
    assert reopened.cursor != "0-0"
    reopened.refresh()
    assert sorted(reopened.mirror.docs.ids()) == [chunk(2).id, chunk(3).id]
    reopened.close()
    fresh = SharedCollection(a.client, a.prefix, tmp_path / "c", DIM)  # no mirror at all
    fresh.refresh()
    assert sorted(fresh.mirror.docs.ids()) == [chunk(2).id, chunk(3).id]
    fresh.close()


def test_when_redis_loses_the_collection_the_mirror_is_dropped_loudly_not_kept_silently(shared, caplog):
    a, b = shared
    add(a, [1, 2])
    b.refresh()
    delete_prefix(a.client, a.prefix)  # Redis restarted without persistence
    with caplog.at_level(logging.ERROR, logger="retriever.redis_collection"):
        assert b.refresh()
    assert len(b) == 0
    assert "2 chunks are dropped" in caplog.text
    add(a, [3])  # written anew: a new epoch, which b follows
    b.refresh()
    assert b.mirror.docs.ids() == [chunk(3).id]


def test_redis_down_serves_reads_from_the_mirror_marks_it_stale_and_refuses_writes(tmp_path):
    server = RedisServer()
    server.start()
    client = redis.Redis.from_url(server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    collection = SharedCollection(client, "kvblend:catalog:default:", tmp_path / "m", DIM)
    try:
        add(collection, [1])
        assert collection.refresh()
        server.stop()
        assert not collection.refresh() and collection.stale
        assert collection.get(chunk(1).id).text == "chunk 1 text\n\n"  # the mirror still answers
        with pytest.raises(CatalogUnavailable, match="does not answer"):
            add(collection, [2])
        assert chunk(2).id not in collection
        server.start()  # no persistence here: the collection in Redis is gone, and the mirror follows
        assert collection.refresh() and not collection.stale
        add(collection, [2])
        assert chunk(2).id in collection
    finally:
        collection.close()
        client.close()
        server.stop()


def test_a_full_redis_refuses_the_catalog_write_as_full_not_down(tmp_path):
    server = RedisServer("--maxmemory", "2mb", "--maxmemory-policy", "noeviction")
    server.start()
    client = redis.Redis.from_url(server.url)
    collection = SharedCollection(client, "kvblend:catalog:{default}:", tmp_path / "m", DIM)
    try:
        with pytest.raises(redis.ResponseError):  # fill it with small values until even those are refused
            for n in range(10_000):
                client.set(f"filler{n}", b"x" * 1024)
        with pytest.raises(CatalogFull, match="maxmemory"):
            add(collection, [1])
        assert chunk(1).id not in collection and collection.refresh()
    finally:
        collection.close()
        client.close()
        server.stop()
