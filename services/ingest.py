"""The ingestion job, and what `kvblend ingest`, `retrieve` and `delete` run (services/commands/ingest.py
parses their flags).

Ingest: documents -> chunks (serving model tokens) -> text + vector (sqlite, faiss) and per-layer KV
(the KV store). A chunk is recorded complete, in one sqlite transaction with its text and vector,
only after its KV entry is durable; a rerun skips complete chunks and reuses KV entries already
written, so a killed job rerun ends with every chunk exactly once.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from blend.cache import ChunkKV
from retriever.chunker import Chunk, Chunker, check_chunk_tokens
from retriever.collection import Collection
from retriever.embedder import Embedder
from retriever.sources import Document, folder_documents, jsonl_documents, musique_documents
from services.precompute import Precompute
from store.chunks import ChunkStore
from store.config import StoreConfig
from services.settings import KV_DIR, ModelConfig

# The disk tier evicts past its budget; ingestion must not evict what it wrote, so the default is large.
DEFAULT_KV_DISK_BYTES = 1 << 40


# -- the KV store the job writes into ---------------------------------------------------------------

class ChunkKVStore(Protocol):
    """What the job needs of a KV store; `StoreKV` adapts the tiered store (store/) to it."""

    def has(self, key: str) -> bool: ...

    def put_chunk(self, key: str, entry: ChunkKV) -> None:
        """Store the entry, every layer of it, or raise; it survives this process when this returns."""
        ...

    def delete_chunk(self, key: str) -> None:
        """Remove every entry of the chunk (manifest and layers); a missing chunk is no error."""
        ...


class StoreKV:
    """A `store.ChunkStore` as the job's KV store."""

    def __init__(self, chunks: ChunkStore):
        self.chunks = chunks

    def has(self, key: str) -> bool:
        return self.chunks.contains(key)  # manifest and every layer; counts no use toward admission

    def put_chunk(self, key: str, entry: ChunkKV) -> None:
        if not self.chunks.put(key, entry):
            raise OSError(f"the KV store did not keep chunk {key} (is its disk budget too small?)")

    def delete_chunk(self, key: str) -> None:
        self.chunks.delete(key)


def kv_store_config(data_dir: Path, disk_bytes: int):
    """Where ingestion writes KV: a disk tier only, as memory tiers would lose it at exit; a server reads
    it by pointing its store's `disk_path` at the same folder."""
    return StoreConfig(cpu_bytes=0, disk_path=data_dir / KV_DIR, disk_bytes=disk_bytes, admit_after=1)


def open_kv_store(data_dir: Path, disk_bytes: int = DEFAULT_KV_DISK_BYTES) -> StoreKV:
    return StoreKV(ChunkStore.from_config(kv_store_config(data_dir, disk_bytes)))


# -- the job ------------------------------------------------------------------------------------

@dataclass
class IngestStats:
    documents: int = 0
    chunks: int = 0  # distinct chunks met in this run
    added: int = 0  # chunks whose text and vector were new
    skipped: int = 0  # chunks already complete: nothing done
    kv_computed: int = 0
    kv_tokens: int = 0
    chunk_s: float = 0.0  # tokenizing and splitting
    embed_s: float = 0.0
    kv_s: float = 0.0  # computing KV
    kv_write_s: float = 0.0  # writing it into the store
    store_s: float = 0.0  # sqlite commits and index updates
    wall_s: float = 0.0

    @property
    def text_rate(self) -> float:
        """New chunks per second for text + embedding (split, embed, record, index), KV aside."""
        seconds = self.chunk_s + self.embed_s + self.store_s
        return self.added / seconds if seconds else 0.0

    @property
    def kv_rate(self) -> float:
        """Chunks per second for KV precompute, computing and writing."""
        seconds = self.kv_s + self.kv_write_s
        return self.kv_computed / seconds if seconds else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "text_chunks_per_s": self.text_rate, "kv_chunks_per_s": self.kv_rate,
                "kv_tokens_per_s": self.kv_tokens / self.kv_s if self.kv_s else 0.0,
                "kv_compute_chunks_per_s": self.kv_computed / self.kv_s if self.kv_s else 0.0}


@dataclass
class _Job:
    collection: Collection
    embedder: Embedder
    kv: Precompute | None
    kv_store: ChunkKVStore | None
    stats: IngestStats = field(default_factory=IngestStats)

    def complete(self, chunk: Chunk) -> bool:
        if chunk.id not in self.collection:
            return False
        if self.kv is None:
            return True
        key = self.kv.key(chunk.token_ids)
        return key in self.collection.kv_keys(chunk.id) and self.kv_store.has(key)

    def flush(self, batch: list[Chunk], done: Callable[[int], object]) -> None:
        """Embed, compute KV, then record the batch; `done(n)` reports chunks as their work finishes."""
        started = time.perf_counter()
        new = [chunk for chunk in batch if chunk.id not in self.collection]
        vectors = self.embedder.embed([chunk.text for chunk in new]) if new else np.zeros((0, Embedder.dim))
        self.stats.embed_s += time.perf_counter() - started
        keys = []
        if self.kv is not None:
            for chunk in batch:
                key = self.kv.key(chunk.token_ids)
                if not self.kv_store.has(key):  # written by an earlier, interrupted run: reuse it
                    started = time.perf_counter()
                    entry = self.kv.compute(chunk.token_ids)
                    computed = time.perf_counter()
                    self.kv_store.put_chunk(key, entry)
                    self.stats.kv_s += computed - started
                    self.stats.kv_write_s += time.perf_counter() - computed
                    self.stats.kv_computed += 1
                    self.stats.kv_tokens += len(chunk.token_ids)
                keys.append((chunk.id, key))
                done(1)
        started = time.perf_counter()
        self.collection.add(new, vectors, keys)
        self.stats.store_s += time.perf_counter() - started
        self.stats.added += len(new)
        if self.kv is None:
            done(len(batch))


def ingest(documents: Iterable[Document], chunker: Chunker, collection: Collection, embedder: Embedder,
           kv: Precompute | None = None, kv_store: ChunkKVStore | None = None, batch_size: int = 32,
           limit: int | None = None, progress: bool = True) -> IngestStats:
    """Chunk, embed, index and (with `kv`) precompute KV for every document not already ingested."""
    from tqdm import tqdm

    if (kv is None) != (kv_store is None):
        raise ValueError("KV precompute needs both a Precompute and a KV store")
    if batch_size < 1:
        raise ValueError(f"batch size {batch_size} must be >= 1")
    job = _Job(collection, embedder, kv, kv_store)
    stats = job.stats
    seen: set[str] = set()
    batch: list[Chunk] = []
    began = time.perf_counter()
    bar = tqdm(unit="chunk", desc="ingest", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for document in documents:
            if limit is not None and stats.documents >= limit:
                break
            stats.documents += 1
            started = time.perf_counter()
            chunks = chunker.split(document.text, document.title, document.doc_id)
            stats.chunk_s += time.perf_counter() - started
            for chunk in chunks:
                if chunk.id in seen:
                    continue
                seen.add(chunk.id)
                stats.chunks += 1
                if job.complete(chunk):
                    stats.skipped += 1
                    bar.update(1)
                    continue
                batch.append(chunk)
                if len(batch) >= batch_size:
                    job.flush(batch, bar.update)
                    batch = []
        if batch:
            job.flush(batch, bar.update)
    finally:
        bar.close()
        collection.save()
        stats.wall_s = time.perf_counter() - began
    return stats


class UnknownChunk(ValueError):
    def __init__(self, chunk_id: str):
        super().__init__(f"unknown chunk id {chunk_id[:100]!r} (`kvblend retrieve` or Retrieve lists ids; "
                         "nothing was deleted)")
        self.chunk_id = chunk_id


def delete_chunks(collection: Collection, delete_kv: Callable[[str], object],
                  chunk_ids: Sequence[str]) -> dict[str, int]:
    """Remove each chunk's KV entries (`delete_kv(key)`), then its text and vector; returns KV entries
    removed per chunk. The one delete, for the command line and the server.

    Every id is checked first, so an unknown one deletes nothing. KV goes first: a delete killed
    part-way leaves the chunk listed, so rerunning it finishes the job.
    """
    unknown = [cid for cid in chunk_ids if cid not in collection]
    if unknown:
        raise UnknownChunk(unknown[0])
    removed = {}
    for cid in dict.fromkeys(chunk_ids):
        keys = collection.kv_keys(cid)
        for key in keys:
            delete_kv(key)
        collection.delete(cid)
        removed[cid] = len(keys)
    collection.save()
    return removed


# -- the commands' work -----------------------------------------------------------------------

@dataclass(frozen=True)
class IngestConfig:
    data_dir: Path
    chunk_tokens: int = 512
    batch_size: int = 32
    with_kv: bool = True
    limit: int | None = None
    index_kind: str | None = None  # None keeps the saved index's kind (flat for a new one)

    def __post_init__(self):
        check_chunk_tokens(self.chunk_tokens)
        if self.batch_size < 1:
            raise ValueError(f"--batch-size {self.batch_size} must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit {self.limit} must be >= 1")


def _say(message: str) -> None:
    print(f"kvblend: {message}", file=sys.stderr)


def read_documents(dataset: Path | None = None, docs: Path | None = None) -> Iterable[Document]:
    """The passages of a MuSiQue-shaped file, else the files of a folder, else JSON lines on stdin."""
    if dataset is not None:
        if not dataset.is_file():
            raise FileNotFoundError(f"--dataset {dataset}: no such file")
        return musique_documents(dataset, _say)
    if docs is not None:
        return folder_documents(docs, _say)
    return jsonl_documents(sys.stdin.buffer, _say)


def serving_tokenizer(model_config: ModelConfig):
    """The serving model's tokenizer alone, for a job that computes no KV."""
    from transformers import AutoTokenizer

    from blend.loader import resolve

    return AutoTokenizer.from_pretrained(resolve(model_config.spec, model_config.cache_dir))


REMOTE_RETRIES = 10  # a batch that fails with UNAVAILABLE (replica restarting, Redis down) is sent again


def ingest_remote(documents: Iterable[Document], target: str, batch: int, token: str | None = None,
                  tenant: str | None = None, limit: int | None = None) -> dict[str, int]:
    """Send documents to a running server (any replica) through IngestChunks, `batch` per call."""
    import grpc

    from services.client import Client, retry_unavailable

    if batch < 1:
        raise ValueError(f"--batch-size {batch} must be >= 1")
    totals = {"documents": 0, "chunks_added": 0, "chunks_existing": 0, "kv_computed": 0, "retries": 0}

    def count_retry(_err) -> None:
        totals["retries"] += 1

    def send(client: Client, pending: list[Document]) -> None:
        payload = [{"text": d.text, "title": d.title, "doc_id": d.doc_id} for d in pending]
        try:
            response = retry_unavailable(lambda: client.ingest(payload), REMOTE_RETRIES,
                                         lambda attempt: min(0.5 * 2 ** attempt, 10.0), count_retry)
        except grpc.RpcError as err:
            raise RuntimeError(f"IngestChunks on {target} failed after {totals['documents']} documents: "
                               f"{err.code().name}: {err.details()} (rerun: what is done is kept)") from None
        totals["documents"] += len(pending)
        for name in ("chunks_added", "chunks_existing", "kv_computed"):
            totals[name] += getattr(response, name)

    with Client(target, token=token, tenant=tenant) as client:
        client.wait_ready(30)
        pending: list[Document] = []
        for count, document in enumerate(documents):
            if limit is not None and count >= limit:
                break
            pending.append(document)
            if len(pending) == batch:
                send(client, pending)
                pending = []
        if pending:
            send(client, pending)
    return totals


def ingest_local(config: IngestConfig, model_config: ModelConfig, documents: Iterable[Document],
                 threads: int | None = None, progress: bool = True) -> tuple[IngestStats, int]:
    """The job on `config.data_dir` with the serving model; returns its figures and the chunks now there."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads {threads} must be >= 1")
        torch.set_num_threads(threads)
    kv = kv_store = None
    if config.with_kv:
        from blend.loader import load

        model = load(model_config.spec, model_config.cache_dir, model_config.torch_dtype, model_config.device)
        tokenizer, kv, kv_store = model.tokenizer, Precompute(model.step, model.tokenizer, model.fingerprint), open_kv_store(config.data_dir)
    else:
        tokenizer = serving_tokenizer(model_config)
    chunker = Chunker(tokenizer, config.chunk_tokens)
    embedder = Embedder()
    collection = Collection(config.data_dir, embedder.dim, config.index_kind)
    try:
        stats = ingest(documents, chunker, collection, embedder, kv, kv_store, config.batch_size,
                       config.limit, progress=progress)
        return stats, len(collection)
    finally:
        collection.close()


def retrieve_from(data_dir: Path, query: str, k: int) -> list:
    """The `k` chunks of the collection in `data_dir` nearest `query`, best first."""
    if k < 1:
        raise ValueError(f"-k {k} must be >= 1")
    if not query.strip():
        raise ValueError("empty --query")
    embedder = Embedder()
    collection = Collection(data_dir, embedder.dim)
    try:
        if not len(collection):
            raise ValueError(f"no chunks in {data_dir} (run `kvblend ingest --data-dir {data_dir}` first)")
        return collection.search(embedder.embed([query]), k)[0]
    finally:
        collection.docs.close()


def delete_from(data_dir: Path, chunk_ids: Sequence[str]) -> dict[str, int]:
    """`delete_chunks` on the collection and KV store in `data_dir`."""
    collection = Collection(data_dir, Embedder.dim)
    try:
        return delete_chunks(collection, open_kv_store(data_dir).delete_chunk, chunk_ids)
    finally:
        collection.close()
