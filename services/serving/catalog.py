"""Each tenant's ingested chunks (retriever.Collection: sqlite texts + faiss index), on one thread.

A sqlite connection belongs to the thread that opened it, and a faiss index is not safe to change
while it is searched, so every collection call runs on the catalog's own thread, one at a time. The
embedder and the chunker's tokenizer live on that thread too (a fast tokenizer shared across threads
can fail with "Already borrowed"). Model work never runs here, so a retrieval never waits for a
generation.

Tenants are kept apart by folder: the default tenant's collection is the data folder itself (where
`kvblend ingest` writes), tenant T's is `<data folder>/tenants/T`. A chunk id is looked up only in
the caller's own collection, so another tenant's id is not found, exactly like one never ingested.

Shared (`server.catalog = "redis"`): each tenant's collection is a `retriever.redis_collection.SharedCollection`
whose record is in Redis under `<redis prefix>catalog:{<tenant>}:`, mirrored locally under
`<data folder>/mirror/<tenant>`. Every lookup of a collection first brings its mirror up to date, so a
request sees every chunk committed before it arrived, through any replica.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from retriever.collection import DOCSTORE_FILE, Collection
from retriever.redis_collection import CatalogFull, CatalogUnavailable, SharedCollection
from services.serving.errors import Overloaded, Unavailable
from services.settings import DEFAULT_TENANT, check_tenant

T = TypeVar("T")
TENANTS_DIR = "tenants"
MIRROR_DIR = "mirror"


def shared_prefix(redis_prefix: str, tenant: str) -> str:
    """Where a tenant's shared collection lives in Redis. The braces are a Redis Cluster hash tag: every key
    of one collection maps to one slot, so its MULTI/EXEC writes stay valid on a cluster."""
    return f"{redis_prefix}catalog:{{{check_tenant(tenant)}}}:"


class Catalog:
    def __init__(self, data_dir: Path, make_embedder: Callable[[], object],
                 make_chunker: Callable[[], object], redis_url: str | None = None, redis_prefix: str = "kvblend:",
                 redis_cluster: bool = False):
        """With `redis_url`, collections are shared through that Redis (or Redis Cluster); otherwise they
        are local folders."""
        self.data_dir = data_dir
        self.redis = None
        if redis_url is not None:
            from store.redis_tier import connect

            self.redis = connect(redis_url, redis_cluster, timeout_s=2.0)
            self.redis_prefix = redis_prefix
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="catalog")
        self._collections: dict[str, Collection] = {}
        # Built on the catalog thread, used only there.
        self.embedder, self.chunker = self._pool.submit(lambda: (make_embedder(), make_chunker())).result()
        self.dim = self.embedder.dim

    def run(self, fn: Callable[..., T], *args) -> T:
        """Run `fn(*args)` on the catalog thread and return its result (or raise its error)."""
        try:
            return self._pool.submit(fn, *args).result()
        except CatalogUnavailable as err:
            raise Unavailable(str(err)) from None
        except CatalogFull as err:
            raise Overloaded(str(err)) from None

    def folder(self, tenant: str) -> Path:
        if self.redis is not None:
            return self.data_dir / MIRROR_DIR / check_tenant(tenant)
        if tenant == DEFAULT_TENANT:
            return self.data_dir
        return self.data_dir / TENANTS_DIR / check_tenant(tenant)

    def collection(self, tenant: str) -> Collection | SharedCollection:
        """The tenant's collection, created on first use and (shared) brought up to date. Catalog thread
        only."""
        found = self._collections.get(tenant)
        if found is None:
            if self.redis is not None:
                found = SharedCollection(self.redis, shared_prefix(self.redis_prefix, tenant), self.folder(tenant),
                                         self.dim)
            else:
                found = Collection(self.folder(tenant), self.dim)
            self._collections[tenant] = found
        if isinstance(found, SharedCollection):
            found.refresh()
        return found

    def existing(self, tenant: str) -> Collection | SharedCollection | None:
        """The tenant's collection if it has ever been written; None otherwise (nothing is created, so
        lookups under made-up tenant names leave no folders behind). Catalog thread only."""
        if tenant in self._collections or (self.folder(tenant) / DOCSTORE_FILE).exists():
            return self.collection(tenant)
        if self.redis is not None and SharedCollection.written(self.redis, shared_prefix(self.redis_prefix, tenant)):
            return self.collection(tenant)
        return None

    def close(self) -> None:
        def close_all():
            for collection in self._collections.values():
                collection.close()
            self._collections.clear()

        self._pool.submit(close_all).result()
        self._pool.shutdown(wait=True)
        if self.redis is not None:
            self.redis.close()
