"""A collection whose record lives in Redis, so that every replica sees every replica's chunks.

Redis holds, under one prefix per collection:
- `epoch`: a random id written once, when the collection is first written;
- `chunk:<id>`: one hash per chunk (text, title, doc id, position, token ids, vector, KV keys);
- `log`: a Redis Stream of `add` and `del` events, each naming chunk ids, in commit order.

A write is one MULTI/EXEC (hashes and their log event together), so a reader never sees an event
whose hashes are missing. Each replica keeps a local mirror (a `Collection`: sqlite + faiss) and a
cursor into the log; `refresh` applies the events past the cursor, which costs one round trip when
nothing changed. Replaying an event is idempotent, so the cursor is saved after the mirror and a
crash in between only replays. If the epoch changes (Redis lost its data and the collection was
written anew) the mirror is rebuilt from the log, with an error logged naming what was dropped.

While Redis does not answer, reads are served from the mirror, which is then marked `stale` (so a
caller can tell "not ingested" from "not known yet") and writes raise `CatalogUnavailable`.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import redis

from retriever.chunker import Chunk
from retriever.collection import Collection, Hit
from retriever.docstore import StoredChunk

log = logging.getLogger(__name__)

_OUTAGE = (redis.ConnectionError, redis.TimeoutError, OSError)
CURSOR_FILE = "catalog.cursor"
START = "0-0"
REPLAY_BATCH = 512  # log events per XRANGE


class CatalogUnavailable(RuntimeError):
    """Redis, which holds the shared catalog, did not answer."""


class CatalogFull(RuntimeError):
    """Redis refused a catalog write (out of memory under `noeviction`)."""


class SharedCollection:
    def __init__(self, client: redis.Redis, prefix: str, mirror_folder: Path, dim: int,
                 on_add: Callable[[list[str]], None] | None = None,
                 on_delete: Callable[[list[str]], None] | None = None):
        """`on_add` is called with the KV keys of chunks the log brings in (added through another replica,
        or before this mirror existed), `on_delete` with those of mirrored chunks the log deletes (deleted
        through another replica); both on the refreshing thread: keep them cheap."""
        self.client = client
        self.on_add = on_add
        self.on_delete = on_delete
        self.prefix = prefix
        self.folder = mirror_folder
        self.dim = dim
        self.mirror = Collection(mirror_folder, dim)
        self.epoch, self.cursor = self._read_cursor()
        self.stale = True

    # -- Redis layout ----------------------------------------------------------------------------

    @property
    def log_key(self) -> str:
        return self.prefix + "log"

    @property
    def epoch_key(self) -> str:
        return self.prefix + "epoch"

    def chunk_key(self, chunk_id: str) -> str:
        return self.prefix + "chunk:" + chunk_id

    @classmethod
    def written(cls, client: redis.Redis, prefix: str) -> bool:
        """Whether a collection under `prefix` was ever written to Redis (without creating anything)."""
        try:
            return bool(client.exists(prefix + "log"))
        except _OUTAGE as err:
            raise CatalogUnavailable(f"the shared catalog in Redis does not answer ({err}); retry when it is "
                                     "back") from None

    # -- the cursor ----------------------------------------------------------------------------------

    def _read_cursor(self) -> tuple[str | None, str]:
        try:
            epoch, cursor = (self.folder / CURSOR_FILE).read_text().split()
            return epoch, cursor
        except (FileNotFoundError, ValueError):
            return None, START

    def _write_cursor(self) -> None:
        path = self.folder / CURSOR_FILE
        staging = path.with_name(path.name + ".partial")
        staging.write_text(f"{self.epoch} {self.cursor}\n")
        os.replace(staging, path)

    # -- reading the log -------------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Apply the log events past the cursor; False (and `stale`) when Redis does not answer."""
        try:
            self._refresh()
        except _OUTAGE as err:
            if not self.stale:
                log.warning("catalog: Redis does not answer (%s); serving the local mirror of %d chunks "
                            "(chunks ingested elsewhere meanwhile are not known here until it is back)",
                            err, len(self.mirror))
            self.stale = True
            return False
        self.stale = False
        return True

    def _refresh(self) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.get(self.epoch_key)
        pipe.xrange(self.log_key, min="(" + self.cursor, count=REPLAY_BATCH)
        raw_epoch, events = pipe.execute()
        epoch = raw_epoch.decode() if raw_epoch is not None else None
        if epoch != self.epoch:
            self._new_epoch(epoch)
            events = self.client.xrange(self.log_key, min="(" + self.cursor, count=REPLAY_BATCH)
        while events:
            for event_id, fields in events:
                self._apply(fields)
                self.cursor = event_id.decode()
            self._write_cursor()
            if len(events) < REPLAY_BATCH:
                break
            events = self.client.xrange(self.log_key, min="(" + self.cursor, count=REPLAY_BATCH)

    def _new_epoch(self, epoch: str | None) -> None:
        """The collection in Redis is not the one the mirror follows: start the mirror over."""
        if self.epoch is not None and len(self.mirror):
            log.error("catalog: the collection in Redis under %r was lost or replaced (epoch %s -> %s); "
                      "the local mirror's %d chunks are dropped and the mirror is rebuilt from Redis "
                      "(re-ingest what is missing; run Redis with appendonly yes)",
                      self.prefix, self.epoch, epoch, len(self.mirror))
        self.mirror.close()
        for name in os.listdir(self.folder):
            if name != CURSOR_FILE:
                target = self.folder / name
                shutil.rmtree(target) if target.is_dir() else target.unlink()
        self.mirror = Collection(self.folder, self.dim)
        self.epoch, self.cursor = epoch, START
        if epoch is not None:
            self._write_cursor()

    def _apply(self, fields: dict) -> None:
        op = fields[b"op"].decode()
        ids = [cid for cid in fields[b"ids"].decode().split(",") if cid]
        if op == "del":
            gone = []
            for cid in ids:
                if cid in self.mirror:  # its own deletes are mirrored already
                    gone += self.mirror.kv_keys(cid)
                    self.mirror.delete(cid)
            if gone and self.on_delete is not None:
                self.on_delete(gone)
            return
        if op != "add":  # written by a newer kvblend: skipping it beats stopping every refresh
            log.warning("catalog: log event of unknown kind %r under %r skipped", op, self.prefix)
            return
        ids = [cid for cid in ids if cid not in self.mirror]  # its own writes are mirrored already
        if not ids:
            return
        pipe = self.client.pipeline(transaction=False)
        for cid in ids:
            pipe.hgetall(self.chunk_key(cid))
        chunks, vectors, kv_keys = [], [], []
        for cid, record in zip(ids, pipe.execute()):
            if not record:
                continue  # deleted since; its `del` event follows
            chunk, vector, keys = _decode(cid, record)
            chunks.append(chunk)
            vectors.append(vector)
            kv_keys += [(cid, key) for key in keys]
        if chunks:
            self.mirror.add(chunks, np.stack(vectors), kv_keys)
            if self.on_add is not None:
                self.on_add([key for _, key in kv_keys])

    # -- writing -------------------------------------------------------------------------------------

    def _write(self, fill) -> None:
        """One MULTI/EXEC: `fill(pipe)` queues the writes, the epoch is set if new."""
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.set(self.epoch_key, uuid.uuid4().hex, nx=True)
            fill(pipe)
            pipe.execute()
        except _OUTAGE as err:
            self.stale = True
            raise CatalogUnavailable(f"the shared catalog in Redis does not answer ({err}); "
                                     "nothing was recorded, retry when it is back") from None
        except redis.ResponseError as err:  # e.g. OOM under noeviction: refused, nothing applied
            raise CatalogFull(f"Redis refused the catalog write ({err}); nothing was recorded (raise Redis "
                              "maxmemory or delete chunks)") from None

    def add(self, chunks: Sequence[Chunk], vectors: np.ndarray, kv_keys: Iterable[tuple[str, str]] = ()) -> None:
        """Record chunks (their KV entries already written) in Redis, then in the mirror."""
        if not len(chunks):
            return
        kv_keys = list(kv_keys)
        keys_of: dict[str, list[str]] = {}
        for cid, key in kv_keys:
            keys_of.setdefault(cid, []).append(key)

        def fill(pipe) -> None:
            for chunk, vector in zip(chunks, vectors, strict=True):
                pipe.hset(self.chunk_key(chunk.id), mapping=_encode(chunk, vector, keys_of.get(chunk.id, [])))
            pipe.xadd(self.log_key, {"op": "add", "ids": ",".join(c.id for c in chunks)})

        self._write(fill)
        self.mirror.add(chunks, vectors, kv_keys)  # read-your-writes here even before the next refresh

    def delete(self, chunk_id: str) -> None:
        def fill(pipe) -> None:
            pipe.delete(self.chunk_key(chunk_id))
            pipe.xadd(self.log_key, {"op": "del", "ids": chunk_id})

        self._write(fill)
        self.mirror.delete(chunk_id)

    # -- reading: the mirror -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.mirror)

    def __contains__(self, chunk_id: str) -> bool:
        return chunk_id in self.mirror

    def get(self, chunk_id: str) -> StoredChunk | None:
        return self.mirror.get(chunk_id)

    def kv_keys(self, chunk_id: str) -> list[str]:
        return self.mirror.kv_keys(chunk_id)

    def search(self, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        return self.mirror.search(vectors, k)

    def save(self) -> None:
        self.mirror.save()

    def close(self) -> None:
        self.mirror.close()


def _encode(chunk: Chunk, vector: np.ndarray, kv_keys: list[str]) -> dict:
    return {"text": chunk.text, "title": chunk.title, "doc_id": chunk.doc_id, "position": chunk.position,
            "token_ids": np.asarray(chunk.token_ids, dtype=np.int32).tobytes(),
            "vector": np.asarray(vector, dtype=np.float32).tobytes(), "kv_keys": "\n".join(kv_keys)}


def _decode(chunk_id: str, record: dict) -> tuple[Chunk, np.ndarray, list[str]]:
    chunk = Chunk(id=chunk_id, text=record[b"text"].decode(), title=record[b"title"].decode(),
                  doc_id=record[b"doc_id"].decode(), position=int(record[b"position"]),
                  token_ids=tuple(np.frombuffer(record[b"token_ids"], dtype=np.int32).tolist()))
    keys = [key for key in record[b"kv_keys"].decode().split("\n") if key]
    return chunk, np.frombuffer(record[b"vector"], dtype=np.float32), keys
