"""Facts about the catalog's open tenant collections: bounded in number, intact when reopened."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np

from retriever.chunker import Chunker
from services.serving.catalog import Catalog
from tests.helpers.corpus import TOPICS

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
