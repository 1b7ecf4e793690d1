"""A chunk store whose sqlite file is deleted or replaced while open refuses writes instead of losing them."""

from __future__ import annotations

import logging
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from retriever.chunker import Chunker
from retriever.collection import DOCSTORE_FILE
from retriever.docstore import DocStore, DocStoreLost
from services.serving.catalog import Catalog
from services.serving.errors import Unavailable
from tests.helpers.corpus import TOPICS

DIM = 8


def _chunks(tokenizer):
    chunks = Chunker(tokenizer, 32).split(" ".join(TOPICS.values()))
    vectors = np.random.default_rng(0).normal(size=(len(chunks), DIM)).astype(np.float32)
    return chunks, vectors


def _remove_sqlite(path):
    for suffix in ("", "-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)


def test_a_commit_after_the_file_is_deleted_raises_and_logs(tmp_path, tokenizer, caplog):
    chunks, vectors = _chunks(tokenizer)
    store = DocStore(tmp_path / DOCSTORE_FILE, DIM)
    store.commit(chunks[:2], vectors[:2])
    _remove_sqlite(store.path)
    with caplog.at_level(logging.ERROR, logger="retriever.docstore"), pytest.raises(DocStoreLost, match="deleted"):
        store.commit(chunks[2:4], vectors[2:4])
    assert str(store.path) in caplog.text
    with pytest.raises(DocStoreLost):
        store.delete(chunks[0].id)
    store.close()


def test_a_commit_after_the_file_is_replaced_raises(tmp_path, tokenizer):
    chunks, vectors = _chunks(tokenizer)
    store = DocStore(tmp_path / DOCSTORE_FILE, DIM)
    store.commit(chunks[:2], vectors[:2])
    other = DocStore(tmp_path / "other.sqlite", DIM)
    other.close()
    _remove_sqlite(store.path)
    shutil.copy(tmp_path / "other.sqlite", store.path)
    with pytest.raises(DocStoreLost, match="replaced"):
        store.commit(chunks[2:4], vectors[2:4])
    store.close()
    assert len(DocStore(store.path, DIM)) == 0  # nothing was acknowledged into the unlinked file


def test_the_catalog_answers_a_write_to_a_deleted_store_with_unavailable(tmp_path, tokenizer):
    chunks, vectors = _chunks(tokenizer)
    catalog = Catalog(tmp_path, lambda: SimpleNamespace(dim=DIM), lambda: Chunker(tokenizer, 32))
    try:
        catalog.run(lambda: catalog.collection("t").add(chunks[:2], vectors[:2]))
        _remove_sqlite(catalog.folder("t") / DOCSTORE_FILE)
        with pytest.raises(Unavailable, match="deleted") as refused:
            catalog.run(lambda: catalog.collection("t").add(chunks[2:4], vectors[2:4]))
        assert str(tmp_path) not in str(refused.value)
        assert catalog.run(lambda: len(catalog.collection("t").index)) == 2  # the refused chunks are not searchable
    finally:
        catalog.close()
