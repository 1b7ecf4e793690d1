"""The service's logic as a plain object: ingest, retrieve, generate (blended, streamed), delete, stats.

`Engine` holds the model, the tiered KV store and the per-tenant catalog. The gRPC server
(services/serving/server.py) only translates messages to these calls and `services.serving.errors` to
status codes, so everything here is testable without a server.

Threads: the model and its tokenizer are used on the model worker's one thread only
(services/serving/scheduler.py); collections, the embedder and the chunker on the catalog's one thread
(services/serving/catalog.py); KV reads and writes happen wherever the caller is (the store is thread-safe).

Tenants: a tenant's chunks live in its own collection, and its chunks' KV keys carry the tenant, so
one tenant's delete or ingest never touches another's entries, and the store's hit/miss pattern says
nothing about what another tenant ingested. The default tenant's keys are the plain content
addresses `kvblend ingest` writes, so a data folder ingested offline is served as it is.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict

import torch

from blend.decode import Sampling, stop_token_ids
from blend.fusor import MODES, BlendConfig, prefill
from blend.loader import LoadedModel
from blend.prompt import PromptLayout
from services.ingest import UnknownChunk, delete_chunks
from services.precompute import Precompute
from services.serving.catalog import Catalog
from services.serving.errors import (Cancelled, DeadlineExceeded, InvalidArgument, NotFound, Overloaded, ServiceError,
                                     Unavailable)
from services.serving.gc_pauses import Pauses
from services.serving.generation import Generation, ModelParts, decode_together
from services.serving.guard import Guard
from services.serving.loading import LoadEstimates, probe_tiers
from services.serving.metrics import Metrics
from services.serving.requests import DocumentIn, GenerateParams, GenerationRequest, IngestResult, Retrieved
from services.serving.scheduler import ModelWorker
from services.serving.warmup import WarmupThread
from services.settings import GuardConfig, ServerConfig, ServeSettings
from store.chunks import ChunkStore
from store.warmup import Warmup, WarmupStats

log = logging.getLogger(__name__)

MAX_QUERY_CHARS = 32768
MAX_DELETE_IDS = 1024
MAX_FIELD_CHARS = 1024  # title, doc id
MAX_MESSAGES = 256  # chat messages per request
MAX_STOPS, MAX_STOP_CHARS = 8, 256
STATS_COUNT_WAIT_S = 0.25  # how long Stats waits for the caller's chunk count from the catalog thread


def _check_each(documents: Sequence[DocumentIn], max_chars: int, setting: str) -> None:
    """Each document has text, at most `max_chars` characters of it, and short title and doc id fields;
    an InvalidArgument naming the document and the limit otherwise."""
    for index, doc in enumerate(documents):
        where = f"document {index}" + (f" (doc_id {doc.doc_id[:80]!r})" if doc.doc_id else "")
        if not doc.text.strip():
            raise InvalidArgument(f"{where} has empty text")
        if len(doc.text) > max_chars:
            raise InvalidArgument(f"{where} has {len(doc.text)} characters, over the limit of {max_chars} "
                                  f"({setting})")
        for name in ("title", "doc_id"):
            if len(getattr(doc, name)) > MAX_FIELD_CHARS:
                raise InvalidArgument(f"document {index}: {name} of {len(getattr(doc, name))} characters "
                                      f"is over the limit of {MAX_FIELD_CHARS}")


# -- the engine -----------------------------------------------------------------------------------

class Engine:
    def __init__(self, model: LoadedModel, store: ChunkStore, catalog: Catalog, config: ServerConfig,
                 guard: GuardConfig | None = None):
        self.model = model
        self.store = store
        self.catalog = catalog
        self.config = config
        self.guard = Guard(guard or GuardConfig())
        self.metrics = Metrics()
        self.draining = False
        if config.check_layer >= model.step.n_layers:
            raise ValueError(f"server.check_layer {config.check_layer} is past the model's last layer "
                             f"{model.step.n_layers - 1}")
        self.shared = catalog.redis is not None  # replicas share the catalog and the KV through Redis
        self.worker = ModelWorker(config.max_waiting, config.max_active,
                                  batch=decode_together if config.batch_decode else None,
                                  max_kv_bytes=config.max_kv_bytes)
        self.estimates = LoadEstimates(model.step.n_layers, enabled=config.loading_controller)
        if config.loading_controller:
            rates = probe_tiers(store.tiered, self.estimates)
            if rates:
                log.info("loading controller: tier read rates at start-up %s",
                         ", ".join(f"{name} {rate / 1e9:.2f} GB/s" for name, rate in rates.items()))
        self.precompute: Precompute = self.worker.call(
            lambda: Precompute(model.step, model.tokenizer, model.fingerprint))
        self.parts = ModelParts(self.precompute, model.tokenizer,
                                frozenset(stop_token_ids(model.tokenizer, model.step.config)),
                                decode_graphs=config.decode_graphs and model.step.device.type == "cuda")
        prefix = len(self.precompute.prefix_ids)
        limit = model.step.max_positions
        if limit and prefix + config.chunk_tokens >= limit:
            raise ValueError(f"server.chunk_tokens {config.chunk_tokens} plus the {prefix}-token "
                             f"system prompt does not fit the model's context of {limit} tokens")
        cuda = model.step.device.type == "cuda"
        pooled = cuda and config.kv_pool_bytes >= 0 and model.step.dtype in (torch.bfloat16, torch.float16)
        if cuda:
            self.worker.call(self._compile_kernels)
        if config.layer_graphs and cuda and not (pooled and config.pool_layer_graphs):
            self.worker.call(self._capture_layer_graphs)  # with pool_layer_graphs: once the pool is open
        if config.kv_pool_bytes >= 0 and cuda:
            if pooled:
                self.worker.call(self._open_kv_pool)
            else:  # FlashAttention's varlen kernel, which decodes over the pool, takes 16-bit floats only
                log.info("KV pool: off for a %s model (16-bit floats only); buffers of their own", model.step.dtype)
        self.worker.call(self._measure_prefill)
        self.warmup, self.warmup_thread = self._start_warmup()
        self.gc = Pauses()  # last: a start-up that fails leaves no callback behind

    def _start_warmup(self) -> tuple[Warmup | None, WarmupThread | None]:
        """With a CPU tier above a bottom tier and `warmup_interval_s`: the warm-up, which pulls into the
        CPU tier the chunks requests recomputed for their slow tier and, with a shared catalog, the chunks
        other replicas added."""
        names = [tier.name for tier in self.store.tiered.tiers]
        if not self.config.warmup_interval_s or "cpu" not in names[:-1]:
            return None, None
        warmup = Warmup(self.store.tiered, "cpu", self.config.warmup_pass_bytes,
                        busy=lambda: self.worker.depth()[0] > 0)
        if self.shared:
            self.catalog.on_shared_add = warmup.offer
            self.catalog.on_shared_delete = self._deleted_elsewhere
        return warmup, WarmupThread(warmup, self.catalog if self.shared else None, self.config.warmup_interval_s)

    def _compile_kernels(self) -> None:
        """On the model thread, before the first request: the step's Triton kernels, every variant; plain causal
        attention at every padded prompt length (per-shape plans); the raw host-to-device copies' one-off check."""
        from store import dma

        step = self.model.step
        with torch.inference_mode():
            seconds = step.compile_kernels()
        if seconds:
            log.info("Triton kernels compiled in %.1f s", seconds)
        started = time.perf_counter()
        shapes = step.warm_attention()
        if shapes:
            log.info("causal attention warmed at %d prompt lengths (up to %d tokens) in %.1f s", shapes,
                     shapes * step.attention_buckets[1], time.perf_counter() - started)
        # store.dma finds the CUDA runtime and checks its copies (a test copy a block, then a test batch; each a
        # synchronize) at its first use: here, not at the first request that loads chunks from the CPU tier.
        log.info("host-to-device copies: %s", ("raw cudaMemcpyBatchAsync, a layer's copies in one call (store.dma)"
                                                if dma.batched() else "raw cudaMemcpyAsync (store.dma)")
                 if dma.available() else "PyTorch's (store.dma found no runtime library)")

    def _capture_layer_graphs(self, kv_pool=None) -> None:
        """On the model thread, before the first request: every bucket's graphs, so no request pays a capture
        (with `kv_pool`, `server.pool_layer_graphs`: each whole layer over it too)."""
        from blend.graphs import LayerGraphs

        step = self.model.step
        step.graphs = LayerGraphs(step, kv_pool=kv_pool)
        with torch.inference_mode():
            seconds = step.graphs.capture_all()
        log.info("layer graphs%s: %d buckets captured in %.1f s", "" if step.graphs.kv_pool is None else
                 " with whole layers over the KV pool", len(step.graphs.buckets), seconds)

    def _open_kv_pool(self) -> None:
        """On the model thread: the KV pool requests' buffers are taken from and, with `step_graphs`, the
        whole-step decode graphs over it (captured now, not at a request)."""
        from blend.cache import KVPool
        from blend.graphs import DecodeGraphs

        step, config = self.model.step, self.config
        size = config.kv_pool_bytes or config.max_kv_bytes or torch.cuda.mem_get_info(step.device)[0] // 4
        block = step.attention_buckets[1] if step.attention_buckets else 512
        tokens = size // step.kv_bytes_per_token // block * block
        step.kv_pool = KVPool(step.n_layers, tokens, step.n_kv_heads, step.head_dim, step.dtype, step.device, block,
                              step.longest_cache)
        log.info("KV pool: %d tokens, %.2f GB", tokens, tokens * step.kv_bytes_per_token / 1e9)
        if config.pool_layer_graphs and config.layer_graphs:
            try:
                self._capture_layer_graphs(step.kv_pool)
            except Exception as err:  # noqa: BLE001 - an opt-in speed-up must not stop the server
                log.warning("server.pool_layer_graphs: not captured (%s: %s); serving with the per-layer graphs",
                            type(err).__name__, err)
                self._capture_layer_graphs()
        if config.step_graphs:
            step.decode_graphs = DecodeGraphs(step, step.kv_pool)
            with torch.inference_mode():
                seconds = step.decode_graphs.capture_all()
            log.info("decode graphs: batch sizes %s captured in %.1f s", step.decode_graphs.buckets, seconds)

    def _measure_prefill(self) -> None:
        """One full prefill of a chunk's length at start-up: warms the kernels and gives the loading
        controller its first prefill cost (every later full prefill refines it)."""
        step = self.model.step
        ids = list(self.precompute.prefix_ids) + [self.precompute.prefix_ids[-1]] * self.config.chunk_tokens
        layout = PromptLayout(tuple(ids[:-1]), (), tuple(ids[-1:]))
        with torch.inference_mode():
            prefill(step, layout, BlendConfig(mode="full"), None)  # first run: allocation and kernel warm-up
            started = time.perf_counter()
            float(prefill(step, layout, BlendConfig(mode="full"), None).logits[0])
            self.estimates.observe_prefill(len(layout) * step.n_layers, time.perf_counter() - started)

    @classmethod
    def open(cls, settings: ServeSettings) -> Engine:
        """Load the model, open the store and the catalog, as `kvblend serve` configures them."""
        from blend.loader import load, resolve
        from retriever.chunker import Chunker
        from retriever.embedder import Embedder

        model_config = settings.model
        model = load(model_config.spec, model_config.cache_dir, model_config.torch_dtype, model_config.device)
        location = resolve(model_config.spec, model_config.cache_dir)

        def make_chunker():
            from transformers import AutoTokenizer

            # The chunker's own tokenizer copy: the model's belongs to the model thread.
            return Chunker(AutoTokenizer.from_pretrained(location), settings.server.chunk_tokens)

        store = ChunkStore.from_config(settings.store)
        shared = settings.server.catalog == "redis"
        catalog = Catalog(settings.server.data_dir, Embedder, make_chunker,
                          settings.store.redis_url if shared else None, settings.store.redis_prefix,
                          settings.store.redis_cluster, max_open=settings.server.max_open_tenants)
        return cls(model, store, catalog, settings.server, settings.guard)

    def _deleted_elsewhere(self, keys: list[str]) -> None:
        """Chunks another replica deleted: not warmed, and this replica's copies dropped (catalog thread)."""
        self.warmup.forget(keys)
        for key in keys:
            self.store.delete_local(key, self.model.step.n_layers)

    # -- keys and tiers --------------------------------------------------------------------------

    def tier_availability(self) -> dict[str, bool]:
        return {tier.name: tier.available for tier in self.store.tiered.tiers}

    def degraded_tiers(self) -> list[str]:
        return [name for name, up in self.tier_availability().items() if not up]

    def lost_stores(self) -> int:
        """How many chunk stores were found deleted or replaced while open (their writes are refused)."""
        return len(self.catalog.lost)

    def probe_tiers(self) -> dict[str, bool]:
        """Ask every tier whether it answers now (only Redis can be down); then the availability map."""
        return {tier.name: tier.check() for tier in self.store.tiered.tiers}

    # -- ingest ------------------------------------------------------------------------------------

    def ingest(self, tenant: str, documents: Sequence[DocumentIn], timeout_s: float | None = None,
               cancelled: Callable[[], bool] | None = None) -> IngestResult:
        """Chunk, compute KV for new chunks (on the model thread), embed and record them, all or nothing:
        a call refused, cancelled (`cancelled()` true) or past its deadline records no chunk, and stops
        between chunks, so nothing more is computed; the KV already written stays and a rerun finds it.
        Overloaded at once when `max_ingest_calls` ingests are in progress or the model's queue is full."""
        started = time.perf_counter()
        deadline = time.monotonic() + timeout_s if timeout_s is not None else None
        self._check_documents(documents)

        def expired() -> bool:
            return deadline is not None and time.monotonic() >= deadline

        def stopped() -> bool:
            return expired() or (cancelled is not None and cancelled())

        def stopped_error(done: int, total: int) -> ServiceError:
            where = f"after {done} of {total} chunks' KV; nothing was recorded (ingest the same documents " \
                    "again: the KV already written is reused)"
            return DeadlineExceeded(f"the deadline passed {where}") if expired() else Cancelled(f"cancelled {where}")

        with self.worker.ingest_place(self.config.max_ingest_calls):
            def split():
                try:
                    return [self.catalog.chunker.split(d.text, d.title, d.doc_id) for d in documents]
                except ValueError as err:
                    raise InvalidArgument(str(err)) from None

            per_document = self.catalog.run(split)
            unique = {chunk.id: chunk for chunks in per_document for chunk in chunks}

            def known() -> set[str]:
                collection = self.catalog.existing(tenant)
                return {cid for cid in unique if collection is not None and cid in collection}

            existing = self.catalog.run(known)
            new = [chunk for cid, chunk in unique.items() if cid not in existing]
            result = IngestResult(chunk_ids=[[c.id for c in chunks] for chunks in per_document],
                                  doc_ids=[d.doc_id for d in documents], existing=len(existing))
            keys = []
            for chunk in new:
                key = self.precompute.key(chunk.token_ids, tenant)
                keys.append((chunk.id, key))
                if self.store.contains(key, bottom_only=self.shared):
                    continue
                if stopped():
                    raise stopped_error(result.kv_computed, len(new))
                try:
                    entry = self.worker.call(functools.partial(self.precompute.compute, chunk.token_ids), stopped,
                                             tenant)
                except Cancelled:  # withdrawn from the queue before its turn
                    raise stopped_error(result.kv_computed, len(new)) from None
                result.kv_computed += 1
                if not self.store.put(key, entry):
                    if self.shared:  # a chunk recorded without its KV in Redis would be recomputed by every replica
                        self._shared_write_failed(chunk.id, len(result.chunk_ids))
                    result.kv_not_stored += 1  # computed again when a request uses it
            if stopped():  # the caller is gone: it never learns of a record, so none is made
                raise stopped_error(result.kv_computed, len(new))

            def commit() -> int:
                collection = self.catalog.collection(tenant)
                fresh = [chunk for chunk in new if chunk.id not in collection]
                if fresh:
                    vectors = self.catalog.embedder.embed([chunk.text for chunk in fresh])
                    collection.add(fresh, vectors, keys)
                    collection.save()
                return len(fresh)

            result.added = self.catalog.run(commit)
        result.existing += len(new) - result.added  # ingested meanwhile by a concurrent call
        result.seconds = time.perf_counter() - started
        return result

    def _check_documents(self, documents: Sequence[DocumentIn]) -> None:
        limit = self.config
        if not documents:
            raise InvalidArgument("no documents to ingest")
        if len(documents) > limit.max_documents:
            raise InvalidArgument(f"{len(documents)} documents in one call, over the limit of "
                                  f"{limit.max_documents}; split the batch")
        _check_each(documents, limit.max_document_chars, "server.max_document_chars")

    # -- retrieve ----------------------------------------------------------------------------------

    def retrieve(self, tenant: str, query: str, k: int = 0) -> list[Retrieved]:
        query = self._check_query(query)
        k = k or self.config.default_top_k
        if not 1 <= k <= self.config.max_top_k:
            raise InvalidArgument(f"k {k} is outside 1..{self.config.max_top_k}")
        return self.catalog.run(self._search, tenant, query, k)

    def _search(self, tenant: str, query: str, k: int) -> list[Retrieved]:
        collection = self.catalog.existing(tenant)
        if collection is None or not len(collection):
            return []
        hits = collection.search(self.catalog.embedder.embed([query]), k)[0]
        return [Retrieved(h.chunk_id, h.score, h.chunk.title, h.chunk.doc_id, h.chunk.text, h.chunk.n_tokens)
                for h in hits]

    def _check_query(self, query: str) -> str:
        if not query or not query.strip():
            raise InvalidArgument("empty query")
        if len(query) > MAX_QUERY_CHARS:
            raise InvalidArgument(f"query of {len(query)} characters is over the limit of {MAX_QUERY_CHARS}")
        return query

    # -- generate ----------------------------------------------------------------------------------

    def blend_config(self, params: GenerateParams) -> tuple[BlendConfig, int]:
        mode = params.mode or self.config.default_mode
        if mode not in MODES:
            raise InvalidArgument(f"unknown mode {mode!r} (choose one of {', '.join(MODES)})")
        ratio = self.config.default_ratio if params.ratio is None else params.ratio
        max_new = params.max_new_tokens or self.config.default_max_new_tokens
        if not 1 <= max_new <= self.config.max_new_tokens:
            raise InvalidArgument(f"max_new_tokens {max_new} is outside 1..{self.config.max_new_tokens}")
        try:
            config = BlendConfig(mode=mode, ratio=ratio, check_layer=self.config.check_layer,
                                 selector=self.config.selector)
        except ValueError as err:
            raise InvalidArgument(str(err)) from None
        return config, max_new

    def sampling(self, params: GenerateParams) -> Sampling:
        if params.seed is not None and not 0 <= params.seed < 1 << 63:
            raise InvalidArgument(f"seed {params.seed} is outside 0..2^63-1")
        if len(params.stop) > MAX_STOPS or any(len(stop) > MAX_STOP_CHARS for stop in params.stop):
            raise InvalidArgument(f"stop: at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters")
        try:
            return Sampling(temperature=params.temperature, top_p=1.0 if params.top_p is None else params.top_p,
                            seed=params.seed)
        except ValueError as err:
            raise InvalidArgument(str(err)) from None

    def _question(self, params: GenerateParams) -> str:
        """The query, or a chat's last user message (what top_k retrieves for)."""
        if not params.messages:
            return self._check_query(params.query)
        if params.query:
            raise InvalidArgument("give a query or chat messages, not both")
        if len(params.messages) > MAX_MESSAGES:
            raise InvalidArgument(f"{len(params.messages)} messages, over the limit of {MAX_MESSAGES}")
        total = sum(len(content) for _, content in params.messages)
        if total > MAX_QUERY_CHARS:
            raise InvalidArgument(f"messages of {total} characters in all, over the limit of {MAX_QUERY_CHARS}")
        for index, (role, _) in enumerate(params.messages):
            if role not in ("system", "user", "assistant"):
                raise InvalidArgument(f"message {index} has role {role[:40]!r} (use system, user or assistant)")
        users = [content for role, content in params.messages if role == "user"]
        if not users or not users[-1].strip():
            raise InvalidArgument("the chat has no user message with text (the last one is the question)")
        return users[-1]

    def _check_inline(self, documents: Sequence[DocumentIn]) -> None:
        limit = self.config
        if len(documents) > limit.max_inline_documents:
            raise InvalidArgument(f"{len(documents)} inline documents, over the limit of "
                                  f"{limit.max_inline_documents} (server.max_inline_documents)")
        _check_each(documents, limit.max_inline_document_chars, "server.max_inline_document_chars")

    def _inline(self, tenant: str, documents: Sequence[DocumentIn]) -> tuple[list[str], list[str], list[range]]:
        """Inline documents as chunks (catalog thread): each document one chunk unless over the chunk size,
        recorded in the tenant's collection when new, so its id works as a chunk id from now on. Their KV is
        not computed here: the request computes what the store lacks, uses it and stores it."""
        try:
            per_document = [self.catalog.chunker.split(d.text, d.title, d.doc_id) for d in documents]
        except ValueError as err:
            raise InvalidArgument(str(err)) from None
        chunks = [chunk for pieces in per_document for chunk in pieces]
        if len(chunks) > self.config.max_chunks:
            raise InvalidArgument(f"the documents make {len(chunks)} chunks, over the limit of "
                                  f"{self.config.max_chunks} (server.max_chunks)")
        collection = self.catalog.collection(tenant)
        fresh = list({c.id: c for c in chunks if c.id not in collection}.values())
        if fresh:
            keys = [(c.id, self.precompute.key(c.token_ids, tenant)) for c in fresh]
            collection.add(fresh, self.catalog.embedder.embed([c.text for c in fresh]), keys)
            collection.save()
        ranges, start = [], 0
        for pieces in per_document:
            ranges.append(range(start, start + len(pieces)))
            start += len(pieces)
        return [c.id for c in chunks], [c.text for c in chunks], ranges

    def generate(self, tenant: str, params: GenerateParams, timeout_s: float | None = None) -> Generation:
        """Check the request, find its chunks and queue it; iterate the result for its messages."""
        arrived = time.perf_counter()
        deadline = time.monotonic() + timeout_s if timeout_s is not None else None
        query = self._question(params)
        config, max_new = self.blend_config(params)
        sampling = self.sampling(params)
        given = [f"{name} ({count})" for name, count in (("chunk_ids", len(params.chunk_ids)),
                                                          ("top_k", params.top_k),
                                                          ("documents", len(params.documents))) if count]
        if len(given) > 1:
            both = f"both {given[0]} and {given[1]}" if len(given) == 2 else f"{', '.join(given)} together"
            raise InvalidArgument(f"give one of chunk_ids, top_k or documents, not {both}")
        if len(params.chunk_ids) > self.config.max_chunks:
            raise InvalidArgument(f"{len(params.chunk_ids)} chunk ids, over the limit of "
                                  f"{self.config.max_chunks}")
        retrieve_s = 0.0
        documents: list[range] = []
        if params.documents:
            self._check_inline(params.documents)
            chunk_ids, texts, documents = self.catalog.run(self._inline, tenant, params.documents)
            scores = []
        elif params.chunk_ids:
            chunk_ids = list(params.chunk_ids)
            texts = self.catalog.run(self._texts, tenant, chunk_ids)
            scores: list[float] = []
        else:
            k = params.top_k or self.config.default_top_k
            if not 1 <= k <= self.config.max_top_k:
                raise InvalidArgument(f"top_k {k} is outside 1..{self.config.max_top_k}")
            began = time.perf_counter()
            hits = self.catalog.run(self._search, tenant, query, k)
            retrieve_s = time.perf_counter() - began
            chunk_ids = [h.chunk_id for h in hits]
            texts, scores = [h.text for h in hits], [h.score for h in hits]
        request = GenerationRequest(tenant, query, texts, chunk_ids, scores, config, max_new, arrived,
                                    retrieve_s, deadline, tuple(documents), params.messages, sampling,
                                    params.stop)
        job = Generation(request, self.parts, self.store, self.estimates, self.metrics, self.guard,
                         self.degraded_tiers(),
                         pull=functools.partial(self.warmup.offer, used=True) if self.warmup is not None else None)
        job.queued = time.perf_counter()
        try:
            self.worker.submit(job)
        except ServiceError:
            self.metrics.reject()
            raise
        self.metrics.admitted()
        return job

    def _texts(self, tenant: str, chunk_ids: list[str]) -> list[str]:
        collection = self.catalog.existing(tenant)
        texts = []
        for cid in chunk_ids:
            chunk = collection.get(cid) if collection is not None else None
            if chunk is None:
                self._not_known_yet(collection, cid)
                raise NotFound(f"unknown chunk id {cid[:100]!r} (ingest it first; ids come from IngestChunks "
                               "or Retrieve)")
            texts.append(chunk.text)
        return texts

    def _shared_write_failed(self, chunk_id: str, documents: int) -> None:
        bottom = self.store.tiered.tiers[-1]
        where = f"the KV of chunk {chunk_id} was not written to the shared tier {bottom.name}; {documents} " \
                "documents not recorded"
        if bottom.refused():  # this write was answered and refused: full, not down (whether Redis is up now
            # says nothing of it: during a restart a probe may find Redis back before this report is made)
            raise Overloaded(f"{where}: Redis refused it (out of memory under noeviction? raise maxmemory or "
                             "delete chunks)")
        raise Unavailable(f"{where}: Redis does not answer; retry")

    @staticmethod
    def _not_known_yet(collection, chunk_id: str) -> None:
        """A shared catalog that could not be brought up to date may lack a chunk another replica added."""
        if collection is not None and collection.stale:
            raise Unavailable(f"chunk id {chunk_id[:100]!r} is not in this replica's copy of the catalog and "
                              "Redis, which holds the shared catalog, does not answer; retry")

    # -- delete ------------------------------------------------------------------------------------

    def delete(self, tenant: str, chunk_ids: Sequence[str]) -> tuple[list[str], int]:
        """Remove chunks (KV first, then text and vector); (deleted ids, KV entries removed)."""
        if not chunk_ids:
            raise InvalidArgument("no chunk ids to delete")
        if len(chunk_ids) > MAX_DELETE_IDS:
            raise InvalidArgument(f"{len(chunk_ids)} chunk ids in one call, over the limit of "
                                  f"{MAX_DELETE_IDS}")

        def work() -> tuple[list[str], int]:
            collection = self.catalog.existing(tenant)
            if collection is None:
                raise NotFound(f"unknown chunk id {chunk_ids[0][:100]!r} (nothing was deleted)")
            try:
                removed = delete_chunks(collection, self.store.delete, chunk_ids)
            except UnknownChunk as err:
                self._not_known_yet(collection, err.chunk_id)
                raise NotFound(f"unknown chunk id {err.chunk_id[:100]!r} (nothing was deleted)") from None
            return list(removed), sum(removed.values())

        return self.catalog.run(work)

    # -- stats and lifecycle -------------------------------------------------------------------------

    def device_memory(self) -> dict:
        """The model device's memory the allocator holds now and at most since start-up (0 on CPU)."""
        device = self.model.step.device
        if device.type != "cuda":
            return {"device_memory_bytes": 0, "device_memory_peak_bytes": 0}
        return {"device_memory_bytes": torch.cuda.memory_reserved(device),
                "device_memory_peak_bytes": torch.cuda.max_memory_reserved(device)}

    def pool_stats(self) -> dict:
        """The KV pool's size, free bytes, and buffers it could not give (all 0 without a pool)."""
        step = self.model.step
        pool = step.kv_pool
        if pool is None:
            return {"kv_pool_bytes": 0, "kv_pool_free_bytes": 0, "kv_pool_misses": 0}
        return {"kv_pool_bytes": pool.tokens * step.kv_bytes_per_token,
                "kv_pool_free_bytes": pool.free_tokens * step.kv_bytes_per_token, "kv_pool_misses": pool.misses}

    def stats(self, tenant: str) -> dict:
        # The warm-up's counters before the tiers': a chunk it counts as pulled is already in the tier's
        # bytes read below (it counts after placing), so the two never disagree in that direction.
        warmup = {"enabled": self.warmup is not None, **self.warmup_stats().as_dict()}
        waiting, active = self.worker.depth()
        kv_held, kv_waiting = self.worker.kv_bytes()
        p50, p99 = self.metrics.ttft_percentiles()
        available = self.tier_availability()
        tiers = []
        for name, tier_stats in self.store.tiered.stats().items():
            tier = next(t for t in self.store.tiered.tiers if t.name == name)
            tiers.append({"name": name, "available": available[name],
                          "skipped_writes": tier.skipped_writes, **tier_stats.as_dict()})

        def count() -> int:
            collection = self.catalog.existing(tenant)
            return len(collection) if collection is not None else 0

        # Stats never waits behind ingest work queued on the catalog thread (chunking and embedding a
        # batch can take seconds): the count is -1 when the catalog has not answered within the wait.
        try:
            tenant_chunks = self.catalog.run(count, wait_s=STATS_COUNT_WAIT_S)
        except TimeoutError:
            tenant_chunks = -1
        metrics = self.metrics
        return {
            "model": self.model.spec, "fingerprint": self.model.fingerprint, "tiers": tiers,
            "degraded_tiers": [name for name, up in available.items() if not up],
            "queue_depth": waiting, "queue_capacity": self.config.max_waiting, "active": active,
            "requests": metrics.requests, "completed": metrics.completed, "failed": metrics.failed,
            "cancelled": metrics.cancelled, "rejected": metrics.rejected,
            "tokens_generated": metrics.tokens_generated, "ttft_p50_s": p50, "ttft_p99_s": p99,
            "tenant_chunks": tenant_chunks, "guard": self.guard.summary(),
            "uptime_s": time.monotonic() - metrics.started, "draining": self.draining,
            "loading": asdict(self.estimates.summary()),
            "decode_steps": metrics.decode_steps, "decode_step_tokens": metrics.decode_step_tokens,
            "decode_step_seconds": metrics.decode_step_seconds,
            "kv_bytes_active": kv_held, "kv_bytes_limit": self.config.max_kv_bytes, "waiting_for_kv": kv_waiting,
            **self.pool_stats(), **self.device_memory(),
            "warmup": warmup,
        }

    def warmup_stats(self) -> WarmupStats:
        return self.warmup.stats() if self.warmup is not None else WarmupStats()

    def close(self, timeout_s: float = 30.0) -> None:
        """Finish the queued and active requests (dropping any left after `timeout_s`), then close."""
        if not self.worker.close(wait=True, timeout=timeout_s):
            self.worker.abort_all(Cancelled("the server stopped before this request finished"))
        if self.warmup_thread is not None:
            self.warmup_thread.stop()
        self.catalog.close()
        self.gc.close()
