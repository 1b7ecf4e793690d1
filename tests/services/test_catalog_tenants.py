"""Facts about the catalog's open tenant collections: bounded in number, intact when reopened, followed
without a request when shared."""

from __future__ import annotations

import os
import uuid
from types import SimpleNamespace

import numpy as np
import redis as redis_py

from retriever.chunker import Chunker
from services.serving.catalog import Catalog
from tests.helpers.corpus import TOPICS
from tests.helpers.kv import REDIS_URL, delete_prefix

DIM = 8


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _catalog(tmp_path, tokenizer, max_open: int) -> Catalog:
    return Catalog(tmp_path, lambda: SimpleNamespace(dim=DIM), lambda: Chunker(tokenizer, 64), max_open=max_open)


def _ingest(catalog: Catalog, tenant: str, text: str) -> list[str]:
    def work():
        chunks = catalog.chunker.split(text, tenant, tenant)
        vectors = np.random.default_rng(len(tenant)).normal(size=(len(chunks), DIM)).astype(np.float32)
        catalog.collection(tenant).add(chunks, vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
        return [c.id for c in chunks]

    return catalog.run(work)


def test_at_most_max_open_tenants_stay_open_and_each_is_intact_on_reuse(tmp_path, tokenizer):
    catalog = _catalog(tmp_path, tokenizer, max_open=2)
    try:
        tenants = [f"t{i}" for i in range(5)]
        texts = list(TOPICS.values())
        ids = {t: _ingest(catalog, t, texts[i % len(texts)]) for i, t in enumerate(tenants)}
        assert catalog.run(catalog.open_tenants) == ["t3", "t4"]
        for tenant in tenants:  # each reopened from its folder, with every chunk and vector
            def check(tenant=tenant):
                collection = catalog.existing(tenant)
                assert len(collection) == len(ids[tenant]) == len(collection.index)
                assert all(collection.get(cid).doc_id == tenant for cid in ids[tenant])
                assert len(catalog.open_tenants()) <= 2

            catalog.run(check)
        assert catalog.run(catalog.open_tenants) == ["t3", "t4"]
    finally:
        catalog.close()


def test_open_file_descriptors_do_not_grow_with_the_number_of_tenants(tmp_path, tokenizer):
    catalog = _catalog(tmp_path, tokenizer, max_open=2)
    try:
        text = next(iter(TOPICS.values()))
        for i in range(3):
            _ingest(catalog, f"warm{i}", text)
        before = _open_fds()
        for i in range(30):
            _ingest(catalog, f"tenant{i}", text)
        assert _open_fds() <= before
    finally:
        catalog.close()


def test_follow_learns_another_replicas_adds_and_deletes_without_a_request_and_hears_their_kv_keys(tmp_path, tokenizer):
    prefix = f"kvblend-test-{uuid.uuid4().hex}:"

    def shared(name: str, max_open: int = 4) -> Catalog:
        return Catalog(tmp_path / name, lambda: SimpleNamespace(dim=DIM), lambda: Chunker(tokenizer, 64),
                       redis_url=REDIS_URL, redis_prefix=prefix, max_open=max_open)

    a, b = shared("a"), shared("b", max_open=1)
    heard: list[str] = []
    heard_deleted: list[str] = []
    b.on_shared_add = heard.extend
    b.on_shared_delete = heard_deleted.extend
    try:
        assert b.run(b.follow) == 0 and b.run(b.open_tenants) == []  # nothing written: nothing opened

        def add(tenant: str, seed: int) -> list[str]:
            def work():
                chunks = a.chunker.split(list(TOPICS.values())[seed], tenant, tenant)
                vectors = np.random.default_rng(seed).normal(size=(len(chunks), DIM)).astype(np.float32)
                a.collection(tenant).add(chunks, vectors, [(c.id, f"{seed:064x}") for c in chunks])
                return [c.id for c in chunks]
            return a.run(work)

        ids = add("default", 1)
        assert b.run(b.follow) == len(ids) and heard == [f"{1:064x}"] * len(ids)
        assert b.run(lambda: all(cid in b.existing("default") for cid in ids))
        add("other", 2)  # a tenant B never served, and no room to open one more: not followed
        assert b.run(b.follow) == len(ids) and b.run(b.open_tenants) == ["default"]
        assert b.run(b.follow) == len(ids) and len(heard) == len(ids)  # nothing new: nothing heard twice
        a.run(lambda: a.collection("default").delete(ids[0]))
        assert b.run(b.follow) == len(ids) - 1 and heard_deleted == [f"{1:064x}"]
    finally:
        a.close()
        b.close()
        client = redis_py.Redis.from_url(REDIS_URL)
        delete_prefix(client, prefix)
        client.close()
