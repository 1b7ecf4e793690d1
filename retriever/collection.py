"""The ingested chunks of one data folder: their texts and vectors (sqlite) and the faiss index over them.

The index file is a cache of the vectors in sqlite: on open it is brought in line with the rows
(vectors of rows it lacks are added, labels without a row are removed), so a job killed before
saving the index loses nothing, and an index file that is missing or of another kind is rebuilt.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retriever.chunker import Chunk
from retriever.docstore import DocStore, StoredChunk
from retriever.index import VectorIndex

log = logging.getLogger(__name__)

DOCSTORE_FILE = "chunks.sqlite"
INDEX_FILE = "index.faiss"


@dataclass(frozen=True)
class Hit:
    chunk_id: str
    score: float
    chunk: StoredChunk


class Collection:
    stale = False  # a local collection is the record itself; a shared one's mirror can lag (retriever.redis_collection)

    def __init__(self, folder: Path, dim: int, index_kind: str | None = None):
        """`index_kind` None keeps the saved index's kind (flat for a new one); another kind rebuilds it."""
        self.folder = folder
        self.docs = DocStore(folder / DOCSTORE_FILE, dim)
        path = folder / INDEX_FILE
        index = VectorIndex.load(path) if path.exists() else None
        if index is None or (index_kind is not None and index.kind != index_kind):
            index = VectorIndex(dim, index_kind or "flat")
            index.dirty = True
        if index.dim != dim:
            raise ValueError(f"{path} holds {index.dim}-dimensional vectors, the embedder gives {dim} "
                             "(delete the file; it is rebuilt from the chunk store)")
        self.index = index
        self._sync()

    def _sync(self) -> None:
        rows = self.docs.ids()
        stale = set(self.index.chunk_ids()) - set(rows)
        missing = [cid for cid in rows if cid not in self.index]
        if stale:
            self.index.remove(sorted(stale))
        if missing:
            self.index.add(missing, self.docs.vectors(missing))
        if stale or missing:
            log.info("index brought in line with the chunk store: %d added, %d removed",
                     len(missing), len(stale))

    def __len__(self) -> int:
        return len(self.docs)

    def __contains__(self, chunk_id: str) -> bool:
        return chunk_id in self.docs

    def get(self, chunk_id: str) -> StoredChunk | None:
        return self.docs.get(chunk_id)

    def kv_keys(self, chunk_id: str) -> list[str]:
        return self.docs.kv_keys(chunk_id)

    def add(self, chunks: Sequence[Chunk], vectors: np.ndarray,
            kv_keys: Iterable[tuple[str, str]] = ()) -> None:
        """Record chunks whose KV entries (`kv_keys`) are already durable; this is their completion record."""
        self.docs.commit(chunks, vectors, kv_keys)
        if len(chunks):
            self.index.add([c.id for c in chunks], vectors)

    def search(self, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        rankings = self.index.search(vectors, k)
        return [[Hit(cid, score, self.docs.get(cid)) for cid, score in row] for row in rankings]

    def delete(self, chunk_id: str) -> None:
        """Drop the chunk's row and vector; its KV entries are the caller's to delete first (`kv_keys`)."""
        self.docs.delete(chunk_id)
        self.index.remove([chunk_id])

    def save(self) -> None:
        if self.index.dirty:
            self.index.save(self.folder / INDEX_FILE)

    def close(self) -> None:
        self.save()
        self.docs.close()
