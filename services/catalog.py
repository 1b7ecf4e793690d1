"""Each tenant's ingested chunks (retriever.Collection: sqlite texts + faiss index), on one thread.

A sqlite connection belongs to the thread that opened it, and a faiss index is not safe to change
while it is searched, so every collection call runs on the catalog's own thread, one at a time. The
embedder and the chunker's tokenizer live on that thread too (a fast tokenizer shared across threads
can fail with "Already borrowed"). Model work never runs here, so a retrieval never waits for a
generation.

Tenants are kept apart by folder: the default tenant's collection is the data folder itself (where
`kvblend ingest` writes), tenant T's is `<data folder>/tenants/T`. A chunk id is looked up only in
the caller's own collection, so another tenant's id is not found, exactly like one never ingested.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from retriever.collection import DOCSTORE_FILE, Collection
from services.serve_config import DEFAULT_TENANT, check_tenant

T = TypeVar("T")
TENANTS_DIR = "tenants"


class Catalog:
    def __init__(self, data_dir: Path, make_embedder: Callable[[], object],
                 make_chunker: Callable[[], object]):
        self.data_dir = data_dir
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="catalog")
        self._collections: dict[str, Collection] = {}
        # Built on the catalog thread, used only there.
        self.embedder, self.chunker = self._pool.submit(lambda: (make_embedder(), make_chunker())).result()
        self.dim = self.embedder.dim

    def run(self, fn: Callable[..., T], *args) -> T:
        """Run `fn(*args)` on the catalog thread and return its result (or raise its error)."""
        return self._pool.submit(fn, *args).result()

    def folder(self, tenant: str) -> Path:
        if tenant == DEFAULT_TENANT:
            return self.data_dir
        return self.data_dir / TENANTS_DIR / check_tenant(tenant)

    def collection(self, tenant: str) -> Collection:
        """The tenant's collection, created on first use. Call on the catalog thread only."""
        found = self._collections.get(tenant)
        if found is None:
            found = Collection(self.folder(tenant), self.dim)
            self._collections[tenant] = found
        return found

    def existing(self, tenant: str) -> Collection | None:
        """The tenant's collection if it has ever been written; None otherwise (nothing is created, so
        lookups under made-up tenant names leave no folders behind). Catalog thread only."""
        if tenant in self._collections or (self.folder(tenant) / DOCSTORE_FILE).exists():
            return self.collection(tenant)
        return None

    def close(self) -> None:
        def close_all():
            for collection in self._collections.values():
                collection.close()
            self._collections.clear()

        self._pool.submit(close_all).result()
        self._pool.shutdown(wait=True)
