"""A faiss inner-product index over unit vectors, labelled by chunk id, saved as one file.

A faiss label is the chunk id read as a 64-bit number shifted into the signed range, so the index
file alone maps its vectors back to chunk ids (faiss keeps the labels in `IndexIDMap2.id_map`) and
a save is one atomic rename; there is no second mapping file to fall out of step.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np

INDEX_KINDS = ("flat", "hnsw")
HNSW_NEIGHBOURS = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128
_SHIFT = 1 << 63
_CHUNK_ID = re.compile(r"[0-9a-f]{16}")


def label_of(chunk_id: str) -> int:
    if not _CHUNK_ID.fullmatch(chunk_id):
        raise ValueError(f"chunk id {chunk_id!r} is not 16 lowercase hex digits")
    label = int(chunk_id, 16) - _SHIFT
    if label == -1:  # faiss's "no result"; one id in 2**64
        raise ValueError(f"chunk id {chunk_id!r} maps to the reserved faiss label -1")
    return label


def chunk_id_of(label: int) -> str:
    return f"{int(label) + _SHIFT:016x}"


def _empty(dim: int, kind: str):
    if kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if kind == "hnsw":
        base = faiss.IndexHNSWFlat(dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        base.hnsw.efSearch = HNSW_EF_SEARCH
        return faiss.IndexIDMap2(base)
    raise ValueError(f"unknown index kind {kind!r} (choose one of {', '.join(INDEX_KINDS)})")


class VectorIndex:
    def __init__(self, dim: int, kind: str = "flat"):
        self.dim = dim
        self.kind = kind
        self._index = _empty(dim, kind)
        self._labels: set[int] = set()
        self.dirty = False  # changed since the last save or load

    @classmethod
    def load(cls, path: Path) -> "VectorIndex":
        index = faiss.read_index(str(path))
        if not isinstance(index, faiss.IndexIDMap2):
            raise ValueError(f"{path} is not a kvblend index (expected a faiss IndexIDMap2)")
        base = faiss.downcast_index(index.index)
        kind = "hnsw" if isinstance(base, faiss.IndexHNSW) else "flat"
        if kind == "hnsw":
            base.hnsw.efSearch = HNSW_EF_SEARCH
        loaded = cls.__new__(cls)
        loaded.dim, loaded.kind, loaded._index, loaded.dirty = index.d, kind, index, False
        loaded._labels = set(faiss.vector_to_array(index.id_map).tolist())
        return loaded

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(path.name + ".partial")
        faiss.write_index(self._index, str(staging))
        with open(staging, "rb") as f:
            os.fsync(f.fileno())
        os.replace(staging, path)
        self.dirty = False

    def __len__(self) -> int:
        return self._index.ntotal

    def __contains__(self, chunk_id: str) -> bool:
        return label_of(chunk_id) in self._labels

    def chunk_ids(self) -> list[str]:
        return [chunk_id_of(label) for label in faiss.vector_to_array(self._index.id_map)]

    def add(self, chunk_ids: Sequence[str], vectors: np.ndarray) -> None:
        labels = np.array([label_of(cid) for cid in chunk_ids], dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(labels), self.dim)
        fresh = np.array([label not in self._labels for label in labels], dtype=bool)
        _, first = np.unique(labels, return_index=True)
        keep = np.zeros(len(labels), dtype=bool)
        keep[first] = True
        keep &= fresh
        if keep.any():
            self._index.add_with_ids(vectors[keep], labels[keep])
            self._labels.update(labels[keep].tolist())
            self.dirty = True

    def remove(self, chunk_ids: Sequence[str]) -> int:
        labels = {label_of(cid) for cid in chunk_ids} & self._labels
        if not labels:
            return 0
        if self.kind == "flat":
            self._index.remove_ids(np.array(sorted(labels), dtype=np.int64))
        else:  # HNSW graphs cannot drop nodes: rebuild from the vectors that stay
            kept = faiss.vector_to_array(self._index.id_map)
            vectors = self._index.index.reconstruct_n(0, len(kept))
            stay = np.array([label not in labels for label in kept.tolist()], dtype=bool)
            self._index = _empty(self.dim, self.kind)
            if stay.any():
                self._index.add_with_ids(vectors[stay], kept[stay])
        self._labels -= labels
        self.dirty = True
        return len(labels)

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """The k nearest chunk ids and inner products for each query row, best first."""
        if k < 1:
            raise ValueError(f"k={k} must be >= 1")
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        if len(self) == 0:
            return [[] for _ in range(len(queries))]
        scores, labels = self._index.search(queries, min(k, len(self)))
        return [[(chunk_id_of(label), float(score)) for label, score in zip(row_labels, row_scores)
                 if label != -1]
                for row_labels, row_scores in zip(labels, scores)]
