"""Facts about the embedder, the faiss index and the collection that keeps them on disk."""

import hashlib

import numpy as np
import pytest

from retriever.chunker import Chunker
from retriever.collection import INDEX_FILE, Collection
from retriever.index import VectorIndex, chunk_id_of, label_of

from tests.helpers.corpus import TOPICS


def _ids(n, seed=0):
    return [hashlib.sha256(f"{seed}:{i}".encode()).hexdigest()[:16] for i in range(n)]


def _vectors(n, dim=8, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_labels_map_back_to_chunk_ids_across_the_whole_range():
    for cid in ["0000000000000000", "7ffffffffffffffe", "8000000000000000", "ffffffffffffffff", *_ids(50)]:
        assert chunk_id_of(label_of(cid)) == cid
    for bad in ["-5cf01430263d7da", "0123456789ABCDEF", "abc"]:
        with pytest.raises(ValueError, match="16 lowercase hex digits"):
            label_of(bad)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_index_persists_reloads_and_deletes(tmp_path, kind):
    ids, vectors = _ids(40), _vectors(40)
    index = VectorIndex(8, kind)
    index.add(ids, vectors)
    index.add(ids[:5], vectors[:5])  # already there: ignored
    assert len(index) == 40
    hits = index.search(vectors[:3], 4)
    assert [row[0][0] for row in hits] == ids[:3] and hits[0][0][1] == pytest.approx(1.0, abs=1e-5)
    index.save(tmp_path / "i.faiss")

    loaded = VectorIndex.load(tmp_path / "i.faiss")
    assert loaded.kind == kind and sorted(loaded.chunk_ids()) == sorted(ids)
    assert loaded.search(vectors[:3], 4) == hits

    assert loaded.remove(ids[:2] + ["0123456789abcdef"]) == 2
    assert ids[0] not in loaded and ids[2] in loaded and len(loaded) == 38
    assert all(cid not in ids[:2] for row in loaded.search(vectors[:2], 38) for cid, _ in row)
    assert loaded.search(vectors[2:3], 1)[0][0][0] == ids[2]


def test_search_asks_for_more_than_there_is(tmp_path):
    index = VectorIndex(8)
    assert index.search(_vectors(1), 5) == [[]]
    index.add(_ids(3), _vectors(3))
    assert len(index.search(_vectors(1), 10)[0]) == 3


def test_embedder_gives_unit_float32_rows_independent_of_batching(embedder):
    texts = list(TOPICS.values())
    together = embedder.embed(texts)
    assert together.dtype == np.float32 and together.shape == (len(texts), 384)
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    alone = np.stack([embedder.embed([t])[0] for t in texts])
    assert np.abs(together - alone).max() < 1e-4


def test_a_question_retrieves_its_own_topic_first(tmp_path, embedder, tokenizer):
    chunks = [c for name, text in TOPICS.items() for c in Chunker(tokenizer, 512).split(text, name)]
    collection = Collection(tmp_path, embedder.dim)
    collection.add(chunks, embedder.embed([c.text for c in chunks]))
    for question, topic in [("Who first reached the top of the highest mountain?", "everest"),
                            ("How do plants make sugar from light?", "photosynthesis"),
                            ("Where did Louis Armstrong's music start?", "jazz")]:
        best = collection.search(embedder.embed([question]), 3)[0][0]
        assert best.chunk.title == topic, (question, best.chunk.title)


def test_collection_rebuilds_an_unsaved_or_stale_index_from_the_chunk_store(tmp_path, tokenizer):
    chunks = Chunker(tokenizer, 24).split(" ".join(TOPICS.values()))
    vectors = _vectors(len(chunks), dim=384)
    first = Collection(tmp_path, 384)
    first.add(chunks[:4], vectors[:4])
    first.close()  # saves an index of 4
    crashed = Collection(tmp_path, 384)
    crashed.add(chunks[4:], vectors[4:])  # never saved, as if killed
    crashed.docs.close()

    reopened = Collection(tmp_path, 384)
    assert sorted(reopened.index.chunk_ids()) == sorted({c.id for c in chunks})
    reopened.delete(chunks[0].id)
    reopened.docs.close()  # the row is gone, the saved index still holds its vector
    again = Collection(tmp_path, 384, index_kind="hnsw")
    assert chunks[0].id not in again.index
    assert len(again.index) == len(again) == len({c.id for c in chunks}) - 1
    assert again.index.kind == "hnsw"
    again.close()
    assert VectorIndex.load(tmp_path / INDEX_FILE).kind == "hnsw"
