"""Chunk texts, metadata, vectors and KV keys in one sqlite file, keyed by chunk id.

This file is the record of what is ingested: a chunk's row is written, with its vector and the keys
of its KV entries, in one transaction after those entries are durable, so a row exists only for a
complete chunk. The faiss index is derived from the vectors here and can always be rebuilt.

An open connection keeps working on a file that was deleted or replaced under it, and what it writes
then is lost at close. So the file's identity (device, inode) is taken at open and checked before each
write transaction; a changed one refuses the write (`DocStoreLost`) rather than acknowledge it.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retriever.chunker import Chunk

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    id TEXT PRIMARY KEY,
    text TEXT NOT NULL,
    title TEXT NOT NULL,
    doc_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    n_tokens INTEGER NOT NULL,
    vector BLOB NOT NULL,
    added REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS kv_keys (
    chunk_id TEXT NOT NULL REFERENCES chunks(id) ON DELETE CASCADE,
    kv_key TEXT NOT NULL,
    PRIMARY KEY (chunk_id, kv_key)
);
"""


class DocStoreLost(OSError):
    """The sqlite file was deleted or replaced while open: writes to it would not survive a restart.
    `path` is for the server's log and health; the message holds no path, so it can reach a client."""

    def __init__(self, message: str, path: Path):
        super().__init__(message)
        self.path = str(path)


@dataclass(frozen=True)
class StoredChunk:
    id: str
    text: str
    title: str
    doc_id: str
    position: int
    n_tokens: int


class DocStore:
    def __init__(self, path: Path, dim: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.dim = dim
        self.db = sqlite3.connect(path)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a committed row survives power loss, not just a crash
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        self._identity = _identity(path)

    def _check_identity(self) -> None:
        now = _identity(self.path)
        if now != self._identity:
            what = "deleted" if now is None else "replaced by another file"
            log.error("chunk store %s was %s while open; refusing writes (they would be lost). Put back a copy "
                      "of the file if there is one, then restart the server to open the file at that path",
                      self.path, what)
            raise DocStoreLost(f"the chunk store of this collection was {what} while the server had it open; "
                               "writes are refused until the server restarts", self.path)

    def close(self) -> None:
        self.db.close()

    def __contains__(self, chunk_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM chunks WHERE id = ?", (chunk_id,)).fetchone() is not None

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]

    def ids(self) -> list[str]:
        return [row[0] for row in self.db.execute("SELECT id FROM chunks ORDER BY rowid")]

    def get(self, chunk_id: str) -> StoredChunk | None:
        row = self.db.execute("SELECT id, text, title, doc_id, position, n_tokens FROM chunks WHERE id = ?",
                              (chunk_id,)).fetchone()
        return StoredChunk(*row) if row else None

    def vectors(self, chunk_ids: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(chunk_ids), self.dim), dtype=np.float32)
        for row, chunk_id in enumerate(chunk_ids):
            blob = self.db.execute("SELECT vector FROM chunks WHERE id = ?", (chunk_id,)).fetchone()
            if blob is None:
                raise KeyError(f"unknown chunk id {chunk_id!r}")
            out[row] = np.frombuffer(blob[0], dtype=np.float32)
        return out

    def kv_keys(self, chunk_id: str) -> list[str]:
        rows = self.db.execute("SELECT kv_key FROM kv_keys WHERE chunk_id = ?", (chunk_id,))
        return [row[0] for row in rows]

    def commit(self, chunks: Sequence[Chunk], vectors: np.ndarray,
               kv_keys: Iterable[tuple[str, str]] = ()) -> None:
        """Record new chunks (with their vectors) and (chunk id, KV key) pairs, all or nothing."""
        now = time.time()
        rows = [(c.id, c.text, c.title, c.doc_id, c.position, len(c.token_ids),
                 np.asarray(v, dtype=np.float32).tobytes(), now)
                for c, v in zip(chunks, vectors, strict=True)]
        self._check_identity()
        with self.db:
            self.db.executemany("INSERT OR IGNORE INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            self.db.executemany("INSERT OR IGNORE INTO kv_keys VALUES (?, ?)", list(kv_keys))

    def delete(self, chunk_id: str) -> bool:
        self._check_identity()
        with self.db:
            return self.db.execute("DELETE FROM chunks WHERE id = ?", (chunk_id,)).rowcount > 0


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino
