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

At most `max_open` collections are open at once (each holds ~3 file descriptors: the sqlite file, its
WAL and shared memory); past that the least recently used one is saved and closed, and reopened from its
folder (and, shared, brought up to date from Redis) on its next use, so any number of tenants fits in the
process's descriptor limit.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import TypeVar

from retriever.collection import DOCSTORE_FILE, Collection
from retriever.docstore import DocStoreLost
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
                 redis_cluster: bool = False, max_open: int = 256):
        """With `redis_url`, collections are shared through that Redis (or Redis Cluster); otherwise they
        are local folders. `max_open` bounds the collections kept open (server.max_open_tenants)."""
        if not isinstance(max_open, int) or max_open < 1:
            raise ValueError(f"max_open {max_open!r} tenants must be an integer >= 1")
        self.data_dir = data_dir
        self.max_open = max_open
        # Hear the KV keys of chunks a shared collection's log adds or deletes (another replica's writes), on
        # this thread: the replica warm-up pulls the added ones and drops this replica's copies of deleted ones.
        self.on_shared_add: Callable[[list[str]], None] | None = None
        self.on_shared_delete: Callable[[list[str]], None] | None = None
        self.redis = None
        if redis_url is not None:
            from store.redis_tier import connect

            self.redis = connect(redis_url, redis_cluster, timeout_s=2.0)
            self.redis_prefix = redis_prefix
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="catalog")
        # Chunk stores found deleted or replaced while open: health is NOT_SERVING while any is listed.
        self.lost: set[str] = set()
        self._collections: OrderedDict[str, Collection | SharedCollection] = OrderedDict()  # oldest use first
        # Built on the catalog thread, used only there.
        self.embedder, self.chunker = self._pool.submit(lambda: (make_embedder(), make_chunker())).result()
        self.dim = self.embedder.dim

    def run(self, fn: Callable[..., T], *args, wait_s: float | None = None) -> T:
        """Run `fn(*args)` on the catalog thread and return its result (or raise its error). With `wait_s`,
        TimeoutError when it has not finished by then (withdrawn if it had not started)."""
        future = self._pool.submit(fn, *args)
        try:
            return future.result(wait_s)
        except FutureTimeout:
            future.cancel()
            raise TimeoutError(f"the catalog thread did not answer within {wait_s} s") from None
        except CatalogUnavailable as err:
            raise Unavailable(str(err)) from None
        except CatalogFull as err:
            raise Overloaded(str(err)) from None
        except DocStoreLost as err:  # logged with its path where it was found; the client gets no path
            self.lost.add(err.path)
            raise Unavailable(str(err)) from None

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
                                         self.dim, self._shared_added, self._shared_deleted)
            else:
                found = Collection(self.folder(tenant), self.dim)
            self._collections[tenant] = found
            while len(self._collections) > self.max_open:
                _, idle = self._collections.popitem(last=False)
                idle.close()  # saves its index; the folder (and Redis) keep everything else
        else:
            self._collections.move_to_end(tenant)
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

    def _shared_added(self, kv_keys: list[str]) -> None:
        if self.on_shared_add is not None:
            self.on_shared_add(kv_keys)

    def _shared_deleted(self, kv_keys: list[str]) -> None:
        if self.on_shared_delete is not None:
            self.on_shared_delete(kv_keys)

    def follow(self) -> int:
        """Bring the shared collections up to date without a request: every open one's, and the default
        tenant's when it has been written and one more collection may open (a tenant this replica has not
        served is followed from its first request). Not a use: the open collections' order is kept, and
        none is closed for it. The number of chunks the followed mirrors hold. Catalog thread only; one
        round trip per collection when nothing changed."""
        if self.redis is None:
            return 0
        total = 0
        for collection in list(self._collections.values()):
            if isinstance(collection, SharedCollection):
                collection.refresh()
            total += len(collection)
        if DEFAULT_TENANT not in self._collections and len(self._collections) < self.max_open:
            collection = self.existing(DEFAULT_TENANT)
            total += len(collection) if collection is not None else 0
        return total

    def open_tenants(self) -> list[str]:
        """The tenants whose collections are open, least recently used first. Catalog thread only."""
        return list(self._collections)

    def close(self) -> None:
        def close_all():
            for collection in self._collections.values():
                collection.close()
            self._collections.clear()

        self._pool.submit(close_all).result()
        self._pool.shutdown(wait=True)
        if self.redis is not None:
            self.redis.close()
