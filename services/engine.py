"""The service's logic as a plain object: ingest, retrieve, generate (blended, streamed), delete, stats.

`Engine` holds the model, the tiered KV store and the per-tenant catalog. The gRPC server
(services/server.py) only translates messages to these calls and `services.errors` to status codes,
so everything here is testable without a server.

Threads: the model and its tokenizer are used on the model worker's one thread only
(services/scheduler.py); collections, the embedder and the chunker on the catalog's one thread
(services/catalog.py); KV reads and writes happen wherever the caller is (the store is thread-safe).

Tenants: a tenant's chunks live in its own collection, and its chunks' KV keys carry the tenant, so
one tenant's delete or ingest never touches another's entries, and the store's hit/miss pattern says
nothing about what another tenant ingested. The default tenant's keys are the plain content
addresses `kvblend ingest` writes, so a data folder ingested offline is served as it is.
"""

from __future__ import annotations

import logging
import math
import queue
import random
import statistics
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from blend.cache import ChunkKV
from blend.decode import greedy, stop_token_ids
from blend.fusor import MODES, BlendConfig, compute_kv, prefill
from blend.loader import LoadedModel
from blend.prompt import DEFAULT_SYSTEM, build_layout
from services.catalog import Catalog
from services.errors import Cancelled, DeadlineExceeded, InvalidArgument, NotFound, ServiceError
from services.scheduler import ModelWorker
from services.serve_config import DEFAULT_TENANT, GuardConfig, ServerConfig, ServeSettings
from services.tier_trace import trace_tiers
from store.chunks import ChunkStore
from store.keys import chunk_key

log = logging.getLogger(__name__)

MAX_QUERY_CHARS = 32768
MAX_DELETE_IDS = 1024
MAX_FIELD_CHARS = 1024  # title, doc id


# -- requests and results -----------------------------------------------------------------------

@dataclass(frozen=True)
class DocumentIn:
    text: str
    title: str = ""
    doc_id: str = ""


@dataclass
class IngestResult:
    chunk_ids: list[list[str]]  # per document, in request order
    doc_ids: list[str]
    added: int = 0
    existing: int = 0
    kv_computed: int = 0
    kv_not_stored: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class Retrieved:
    chunk_id: str
    score: float
    title: str
    doc_id: str
    text: str
    tokens: int


@dataclass(frozen=True)
class GenerateParams:
    query: str
    chunk_ids: tuple[str, ...] = ()
    top_k: int = 0  # 0 with no chunk ids: the server's default
    mode: str = ""  # "" = the server's default
    ratio: float | None = None
    max_new_tokens: int = 0  # 0 = the server's default


@dataclass
class QualityCheck:
    checked: bool = False
    kl: float = 0.0
    agree: bool = False
    fell_back: bool = False


@dataclass
class Report:
    mode: str
    ratio: float
    chunk_ids: list[str]
    scores: list[float]
    prompt_tokens: int = 0
    chunk_tokens: int = 0
    chunks_hit: dict[str, int] = field(default_factory=dict)
    chunks_missing: int = 0
    missing_tokens: int = 0
    tokens_recomputed: int = 0
    queue_s: float = 0.0
    retrieve_s: float = 0.0
    load_s: float = 0.0
    load_wait_s: float = 0.0
    compute_s: float = 0.0
    missing_compute_s: float = 0.0
    quality: QualityCheck = field(default_factory=QualityCheck)
    degraded_tiers: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Piece:
    """One streamed message: its tokens and their text; the first carries TTFT and the report, the
    last the finish."""

    text: str
    token_ids: tuple[int, ...]
    ttft_s: float | None = None
    report: Report | None = None
    finish: Finish | None = None


@dataclass(frozen=True)
class Finish:
    reason: str  # stop, length or context
    tokens: int
    seconds: float


# -- the per-request KV source ------------------------------------------------------------------

class _PrefixedSource:
    """The system prefix (in memory, exact) then the store's chunks; times how long prefill waits."""

    def __init__(self, prefix: ChunkKV, chunks):
        self.prefix = prefix
        self.chunks = chunks
        self.starts = [prefix.start] + (list(chunks.starts) if chunks is not None else [])
        self.wait_s = 0.0

    def layer(self, index: int) -> list[torch.Tensor]:
        started = time.perf_counter()
        blocks = self.chunks.layer(index) if self.chunks is not None else []
        self.wait_s += time.perf_counter() - started
        return [self.prefix.kv[index], *blocks]

    def close(self) -> None:
        if self.chunks is not None:
            self.chunks.close()


# -- one generation: a job on the model thread ---------------------------------------------------

_DONE = object()


class Generation:
    """A Generate request: prefilled and decoded on the model thread, read as an iterator of `Piece`s
    by the caller. `cancel()` (the RPC went away) makes the model thread drop it before its next token."""

    def __init__(self, engine: Engine, tenant: str, query: str, texts: list[str], chunk_ids: list[str],
                 scores: list[float], config: BlendConfig, max_new_tokens: int, arrived: float,
                 retrieve_s: float, deadline: float | None):
        self.engine = engine
        self.tenant = tenant
        self.query = query
        self.texts = texts
        self.config = config
        self.max_new_tokens = max_new_tokens
        self.arrived = arrived
        self.deadline = deadline
        self.queued = arrived  # set again when it enters the queue
        self.report = Report(mode=config.mode, ratio=config.ratio if config.mode == "blend" else 0.0,
                             chunk_ids=chunk_ids, scores=scores, retrieve_s=retrieve_s)
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._expired = False
        self._tokens: Iterator[int] | None = None
        self._ids: list[int] = []
        self._shown = ""
        self._limit = max_new_tokens
        self._clamped = False

    # -- the caller's side ----------------------------------------------------------------------

    def __iter__(self) -> Iterator[Piece]:
        while True:
            event = self._events.get()
            if event is _DONE:
                return
            if isinstance(event, BaseException):
                raise event
            yield event

    def cancel(self) -> None:
        self._cancelled.set()
        self._events.put(_DONE)

    # -- the model thread's side (scheduler.Job) --------------------------------------------------

    def cancelled(self) -> bool:
        if self.deadline is not None and time.monotonic() > self.deadline and not self._cancelled.is_set():
            self._expired = True
            self._cancelled.set()
        return self._cancelled.is_set()

    def fail(self, error: BaseException) -> None:
        if self._expired and isinstance(error, Cancelled):
            error = DeadlineExceeded("the call's deadline passed before the answer was complete")
        self.engine.metrics.ended(cancelled=isinstance(error, Cancelled), failed=not isinstance(error, Cancelled))
        self._events.put(error)
        self._events.put(_DONE)

    def start(self) -> bool:
        engine, step = self.engine, self.engine.model.step
        started = time.perf_counter()
        self.report.queue_s = started - self.queued
        layout = build_layout(engine.model.tokenizer, self.texts, self.query, DEFAULT_SYSTEM)
        if layout.prefix != engine.prefix.token_ids:
            raise RuntimeError("the prompt's system prefix is not the one the engine computed")
        n = len(layout)
        chunk_tokens = sum(map(len, layout.chunks))
        limit = step.max_positions
        if limit and n >= limit:
            raise InvalidArgument(
                f"the prompt is {n} tokens (system {len(layout.prefix)}, {len(layout.chunks)} chunks "
                f"{chunk_tokens}, question {len(layout.suffix)}), over the model's context of {limit} "
                "tokens; use fewer chunks or a shorter question")
        if limit and n + self.max_new_tokens > limit:
            self._limit, self._clamped = limit - n, True
        self.report.prompt_tokens, self.report.chunk_tokens = n, chunk_tokens
        self.report.degraded_tiers = engine.degraded_tiers()
        filled = self._prefill(layout, n + self._limit)
        self.report.tokens_recomputed = filled.recomputed if self.config.mode == "blend" else 0
        if self.config.mode == "blend" and engine.guard.sample():
            filled = self._check(layout, filled, n + self._limit)
        self._tokens = greedy(step, filled.cache, filled.length, filled.logits, self._limit, engine.stop_ids)
        return self._emit(first=True)

    def step(self) -> bool:
        return self._emit(first=False)

    def _prefill(self, layout, capacity: int):
        engine, step = self.engine, self.engine.model.step
        cached = {"full": 0, "prefix": min(1, len(layout.chunks)), "reuse": len(layout.chunks),
                  "blend": len(layout.chunks)}[self.config.mode]
        if self.config.mode == "full":
            started = time.perf_counter()
            filled = prefill(step, layout, self.config, None, capacity)
            self.report.compute_s = time.perf_counter() - started
            return filled
        keys = [engine.kv_key(self.tenant, ids) for ids in layout.chunks[:cached]]
        missing_s = [0.0]

        def compute(index: int) -> ChunkKV:
            began = time.perf_counter()
            chunk = compute_kv(step, layout.chunks[index], behind=engine.prefix)
            missing_s[0] += time.perf_counter() - began
            return chunk

        engine.trace.watch(keys)
        source = None
        try:
            began = time.perf_counter()
            chunks = engine.store.source(keys, compute, device=step.device) if keys else None
            build_s = time.perf_counter() - began
            source = _PrefixedSource(engine.prefix, chunks)
            began = time.perf_counter()
            filled = prefill(step, layout, self.config, source, capacity)
            prefill_s = time.perf_counter() - began
        finally:
            if source is not None:
                source.close()
            tiers, load_s = engine.trace.finish()
        computed = chunks.computed if chunks is not None else {}
        for index, key in enumerate(keys):
            if index in computed:
                continue
            tier = tiers.get(key, "unknown")
            self.report.chunks_hit[tier] = self.report.chunks_hit.get(tier, 0) + 1
        self.report.chunks_missing = len(computed)
        self.report.missing_tokens = sum(len(layout.chunks[i]) for i in computed)
        self.report.missing_compute_s = missing_s[0]
        self.report.load_s = load_s
        self.report.load_wait_s = max(0.0, build_s + source.wait_s - missing_s[0])
        self.report.compute_s = max(0.0, prefill_s - source.wait_s)
        return filled

    def _check(self, layout, blended, capacity: int):
        """The quality guard: full prefill's first token against blend's; the full answer if too far."""
        from services.evaluate import kl_divergence

        full = prefill(self.engine.model.step, layout, BlendConfig(mode="full"), None, capacity)
        kl = kl_divergence(full.logits, blended.logits)
        agree = int(full.logits.argmax()) == int(blended.logits.argmax())
        fell_back = not kl <= self.engine.guard.config.max_kl
        self.report.quality = QualityCheck(checked=True, kl=kl, agree=agree, fell_back=fell_back)
        self.engine.guard.record(kl, agree, fell_back)
        return full if fell_back else blended

    def _emit(self, first: bool) -> bool:
        """Produce the next token (or the end) as one message; True while more may follow."""
        token = None
        if len(self._ids) < self._limit:
            token = next(self._tokens, None)
        now = time.perf_counter()
        ids: tuple[int, ...] = ()
        if token is not None:
            self._ids.append(token)
            ids = (token,)
            self.engine.metrics.token()
        text = self._new_text(final=token is None)
        finish = None
        if token is None:
            reason = "stop" if len(self._ids) < self._limit else ("context" if self._clamped else "length")
            finish = Finish(reason=reason, tokens=len(self._ids), seconds=now - self.arrived)
        ttft = now - self.arrived if first else None
        if first:
            self.engine.metrics.first_token(ttft)
        self._events.put(Piece(text=text, token_ids=ids, ttft_s=ttft, report=self.report if first else None,
                               finish=finish))
        if finish is None and len(self._ids) >= self._limit:
            # The last token is out: end now rather than spend a forward on logits nobody reads.
            reason = "context" if self._clamped else "length"
            self._events.put(Piece(text=self._new_text(final=True), token_ids=(),
                                   finish=Finish(reason, len(self._ids), time.perf_counter() - self.arrived)))
            finish = True
        if finish is not None:
            self.engine.metrics.ended()
            self._events.put(_DONE)
            return False
        return True

    def _new_text(self, final: bool) -> str:
        text = self.engine.model.tokenizer.decode(self._ids, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return ""  # the token ends inside a character: wait for the rest of its bytes
        piece = text[len(self._shown):] if text.startswith(self._shown) else text
        self._shown = text
        return piece


# -- metrics --------------------------------------------------------------------------------------

class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests = self.completed = self.failed = self.cancelled = self.rejected = 0
        self.tokens_generated = 0
        self.ttfts: deque[float] = deque(maxlen=1000)
        self.started = time.monotonic()

    def admitted(self) -> None:
        with self._lock:
            self.requests += 1

    def reject(self) -> None:
        with self._lock:
            self.rejected += 1

    def token(self) -> None:
        with self._lock:
            self.tokens_generated += 1

    def first_token(self, ttft: float) -> None:
        with self._lock:
            self.ttfts.append(ttft)

    def ended(self, cancelled: bool = False, failed: bool = False) -> None:
        with self._lock:
            if cancelled:
                self.cancelled += 1
            elif failed:
                self.failed += 1
            else:
                self.completed += 1

    def ttft_percentiles(self) -> tuple[float, float]:
        with self._lock:
            values = sorted(self.ttfts)
        if not values:
            return 0.0, 0.0
        return values[len(values) // 2], values[min(len(values) - 1, math.ceil(0.99 * len(values)) - 1)]


class Guard:
    """Sampling and bookkeeping of the quality guard (see `Generation._check`)."""

    def __init__(self, config: GuardConfig):
        self.config = config
        self._random = random.Random(config.seed)
        self._lock = threading.Lock()
        self.checked = self.fell_back = self.agreed = 0
        self.kls: list[float] = []

    def sample(self) -> bool:
        if self.config.fraction <= 0.0:
            return False
        with self._lock:
            return self._random.random() < self.config.fraction

    def record(self, kl: float, agree: bool, fell_back: bool) -> None:
        with self._lock:
            self.checked += 1
            self.agreed += int(agree)
            self.fell_back += int(fell_back)
            self.kls.append(kl)

    def summary(self) -> dict:
        with self._lock:
            return {"fraction": self.config.fraction, "max_kl": self.config.max_kl, "checked": self.checked,
                    "fell_back": self.fell_back,
                    "mean_kl": statistics.fmean(self.kls) if self.kls else 0.0,
                    "agreement": self.agreed / self.checked if self.checked else 0.0}


# -- the engine -----------------------------------------------------------------------------------

class Engine:
    def __init__(self, model: LoadedModel, store: ChunkStore, catalog: Catalog, config: ServerConfig,
                 guard: GuardConfig = GuardConfig()):
        self.model = model
        self.store = store
        self.catalog = catalog
        self.config = config
        self.guard = Guard(guard)
        self.metrics = Metrics()
        self.draining = False
        if config.check_layer >= model.step.n_layers:
            raise ValueError(f"server.check_layer {config.check_layer} is past the model's last layer "
                             f"{model.step.n_layers - 1}")
        self.trace = trace_tiers(store.tiered)
        self.worker = ModelWorker(config.max_waiting, config.max_active)
        self.stop_ids = stop_token_ids(model.tokenizer, model.step.config)

        def system_prefix() -> ChunkKV:
            ids = build_layout(model.tokenizer, [], "x", DEFAULT_SYSTEM).prefix
            return compute_kv(model.step, ids)

        self.prefix: ChunkKV = self.worker.call(system_prefix)
        limit = model.step.max_positions
        if limit and len(self.prefix) + config.chunk_tokens >= limit:
            raise ValueError(f"server.chunk_tokens {config.chunk_tokens} plus the {len(self.prefix)}-token system "
                             f"prompt does not fit the model's context of {limit} tokens")

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
        catalog = Catalog(settings.server.data_dir, Embedder, make_chunker)
        return cls(model, store, catalog, settings.server, settings.guard)

    # -- keys and tiers --------------------------------------------------------------------------

    def kv_key(self, tenant: str, token_ids: Sequence[int]) -> str:
        namespace = self.model.fingerprint if tenant == DEFAULT_TENANT else f"{self.model.fingerprint}/t/{tenant}"
        return chunk_key(namespace, self.prefix.token_ids, token_ids, self.model.step.dtype)

    def tier_availability(self) -> dict[str, bool]:
        return {tier.name: bool(getattr(tier, "available", True)) for tier in self.store.tiered.tiers}

    def degraded_tiers(self) -> list[str]:
        return [name for name, up in self.tier_availability().items() if not up]

    def probe_tiers(self) -> dict[str, bool]:
        """Ask the tiers that can be down (Redis) whether they answer now; then the availability map."""
        for tier in self.store.tiered.tiers:
            if hasattr(tier, "check"):
                tier.check()
        return self.tier_availability()

    # -- ingest ------------------------------------------------------------------------------------

    def ingest(self, tenant: str, documents: Sequence[DocumentIn]) -> IngestResult:
        started = time.perf_counter()
        self._check_documents(documents)

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
            key = self.kv_key(tenant, chunk.token_ids)
            keys.append((chunk.id, key))
            if self.store.contains(key):
                continue
            entry = self.worker.call(lambda ids=chunk.token_ids: compute_kv(self.model.step, ids, behind=self.prefix))
            result.kv_computed += 1
            if not self.store.put(key, entry):
                result.kv_not_stored += 1  # computed again when a request uses it

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
        for index, doc in enumerate(documents):
            if not doc.text.strip():
                raise InvalidArgument(f"document {index} (doc_id {doc.doc_id[:80]!r}) has empty text")
            if len(doc.text) > limit.max_document_chars:
                raise InvalidArgument(f"document {index} (doc_id {doc.doc_id[:80]!r}) has {len(doc.text)} "
                                      f"characters, over the limit of {limit.max_document_chars}")
            for name in ("title", "doc_id"):
                if len(getattr(doc, name)) > MAX_FIELD_CHARS:
                    raise InvalidArgument(f"document {index}: {name} of {len(getattr(doc, name))} characters "
                                          f"is over the limit of {MAX_FIELD_CHARS}")

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
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
            raise InvalidArgument(f"recompute ratio {ratio!r} is outside [0, 1]")
        max_new = params.max_new_tokens or self.config.default_max_new_tokens
        if not 1 <= max_new <= self.config.max_new_tokens:
            raise InvalidArgument(f"max_new_tokens {max_new} is outside 1..{self.config.max_new_tokens}")
        try:
            config = BlendConfig(mode=mode, ratio=float(ratio), check_layer=self.config.check_layer)
        except ValueError as err:
            raise InvalidArgument(str(err)) from None
        return config, max_new

    def generate(self, tenant: str, params: GenerateParams, timeout_s: float | None = None) -> Generation:
        """Check the request, find its chunks and queue it; iterate the result for its messages."""
        arrived = time.perf_counter()
        deadline = time.monotonic() + timeout_s if timeout_s is not None else None
        query = self._check_query(params.query)
        config, max_new = self.blend_config(params)
        if params.chunk_ids and params.top_k:
            raise InvalidArgument(f"give chunk_ids ({len(params.chunk_ids)}) or top_k ({params.top_k}), not both")
        if len(params.chunk_ids) > self.config.max_chunks:
            raise InvalidArgument(f"{len(params.chunk_ids)} chunk ids, over the limit of {self.config.max_chunks}")
        retrieve_s = 0.0
        if params.chunk_ids:
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
            chunk_ids, texts, scores = [h.chunk_id for h in hits], [h.text for h in hits], [h.score for h in hits]
        job = Generation(self, tenant, query, texts, chunk_ids, scores, config, max_new, arrived, retrieve_s,
                         deadline)
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
                raise NotFound(f"unknown chunk id {cid[:100]!r} (ingest it first; ids come from IngestChunks "
                               "or Retrieve)")
            texts.append(chunk.text)
        return texts

    # -- delete ------------------------------------------------------------------------------------

    def delete(self, tenant: str, chunk_ids: Sequence[str]) -> tuple[list[str], int]:
        """Remove chunks (KV first, then text and vector); (deleted ids, KV entries removed)."""
        if not chunk_ids:
            raise InvalidArgument("no chunk ids to delete")
        if len(chunk_ids) > MAX_DELETE_IDS:
            raise InvalidArgument(f"{len(chunk_ids)} chunk ids in one call, over the limit of {MAX_DELETE_IDS}")

        def work() -> tuple[list[str], int]:
            collection = self.catalog.existing(tenant)
            for cid in chunk_ids:
                if collection is None or cid not in collection:
                    raise NotFound(f"unknown chunk id {cid[:100]!r} (nothing was deleted)")
            removed = 0
            ids = list(dict.fromkeys(chunk_ids))
            for cid in ids:
                # KV first: a delete cut short leaves the chunk listed, so repeating it finishes the job.
                for key in collection.kv_keys(cid):
                    self.store.delete(key)
                    removed += 1
                collection.delete(cid)
            collection.save()
            return ids, removed

        return self.catalog.run(work)

    # -- stats and lifecycle -------------------------------------------------------------------------

    def stats(self, tenant: str) -> dict:
        waiting, active = self.worker.depth()
        p50, p99 = self.metrics.ttft_percentiles()
        available = self.tier_availability()
        tiers = []
        for name, tier_stats in self.store.tiered.stats().items():
            tier = next(t for t in self.store.tiered.tiers if t.name == name)
            tiers.append({"name": name, "available": available[name],
                          "skipped_writes": getattr(tier, "skipped_writes", 0), **tier_stats.as_dict()})

        def count() -> int:
            collection = self.catalog.existing(tenant)
            return len(collection) if collection is not None else 0

        metrics = self.metrics
        return {
            "model": self.model.spec, "fingerprint": self.model.fingerprint, "tiers": tiers,
            "degraded_tiers": [name for name, up in available.items() if not up],
            "queue_depth": waiting, "queue_capacity": self.config.max_waiting, "active": active,
            "requests": metrics.requests, "completed": metrics.completed, "failed": metrics.failed,
            "cancelled": metrics.cancelled, "rejected": metrics.rejected,
            "tokens_generated": metrics.tokens_generated, "ttft_p50_s": p50, "ttft_p99_s": p99,
            "tenant_chunks": self.catalog.run(count), "guard": self.guard.summary(),
            "uptime_s": time.monotonic() - metrics.started, "draining": self.draining,
        }

    def drain(self, timeout_s: float) -> bool:
        """Take no new requests and finish the queued ones; True if all finished within the time."""
        self.draining = True
        finished = self.worker.close(wait=True, timeout=timeout_s)
        if not finished:
            self.worker.abort_all(Cancelled("the server stopped before this request finished"))
        return finished

    def close(self) -> None:
        self.worker.close(wait=True, timeout=5.0)
        self.catalog.close()
