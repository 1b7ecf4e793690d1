"""`kvblend serve`: the gRPC edge over `services.serving.engine.Engine`.

This file translates messages to engine calls and `services.serving.errors` to status codes, checks bearer
tokens and picks the tenant, and runs the standard health and reflection services. It holds no logic
of its own beyond that.

Health: the overall service ("") and `kvblend.v1.ChunkCache` are SERVING while the server takes
requests (NOT_SERVING once it drains, or once a tenant's chunk store was found deleted or replaced
while open: its writes are refused until a restart; then
`kvblend.v1.ChunkCache/catalog` is NOT_SERVING too); each store tier has its own entry,
`kvblend.v1.ChunkCache/tier/<name>`, NOT_SERVING while that tier is down (Redis unreachable). A
down Redis only makes requests slower (their KV is recomputed), so it does not fail readiness.

With `--http-port`, the same engine, tokens and tenants also serve the OpenAI-compatible HTTP API
(services/serving/openai_http.py).

Metrics: every call is counted once by method and status code in the engine's metrics; with
`--metrics-port` they are served to Prometheus over HTTP (services/serving/prometheus.py).
"""

from __future__ import annotations

import functools
import logging
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from proto import kvblend_pb2 as pb
from proto import kvblend_pb2_grpc as pb_grpc
from services.serving import errors, gc_pauses
from services.serving.auth import Tenants
from services.settings import AuthConfig, ServeSettings

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["ChunkCache"].full_name  # kvblend.v1.ChunkCache
MAX_MESSAGE_BYTES = 32 << 20
MAX_CONNECTION_AGE_MS = 5 * 60 * 1000
MAX_CONNECTION_AGE_GRACE_MS = 10 * 60 * 1000  # a long Generate in flight is not cut
DEADLINE_SLACK_S = 0.1  # a call that ends this close to its deadline is counted DEADLINE_EXCEEDED
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING

STATUS = {  # first match wins: subclasses before their bases
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}


CATALOG_HEALTH = f"{SERVICE}/catalog"


def tier_health_name(tier: str) -> str:
    return f"{SERVICE}/tier/{tier}"


class Unreadable:
    """A request whose bytes do not parse as its message (garbage, or a string field that is not UTF-8). The
    handler answers it INVALID_ARGUMENT; gRPC's own deserializer would answer INTERNAL and log a traceback,
    so any peer, authenticated or not, could fill the log."""

    def __init__(self, message_type, error: DecodeError):
        self.what = f"the request is not a valid {message_type.DESCRIPTOR.full_name} message ({error}); " \
                    "string fields must be UTF-8"


def _lenient(message_type):
    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except DecodeError as err:
            return Unreadable(message_type, err)
    return parse


def _readable(request):
    if isinstance(request, Unreadable):
        raise errors.InvalidArgument(request.what)
    return request


def add_chunk_cache(servicer, server) -> None:
    """Register the ChunkCache methods, as the generated `add_ChunkCacheServicer_to_server` does, but with
    deserializers that hand an unparseable request to the handler (`Unreadable`) instead of failing."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["ChunkCache"].methods:
        request, response = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(getattr(servicer, method.name), request_deserializer=_lenient(request),
                                     response_serializer=response.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


def _status_of(err: errors.ServiceError) -> grpc.StatusCode:
    return next((code for kind, code in STATUS.items() if isinstance(err, kind)), grpc.StatusCode.INTERNAL)


class _Outcome:
    """Counts one call once in the engine's metrics: with the status its handler ends it with, or, when it
    ends first (the client went away or its deadline passed), with the status the client saw."""

    def __init__(self, metrics, method: str, context):
        self.metrics = metrics
        self.method = method
        self._counted = False
        self._lock = threading.Lock()
        if not context.add_callback(lambda: self.end(_gone(context))):
            self.end(_gone(context))

    def end(self, code: str) -> None:
        with self._lock:
            if self._counted:
                return
            self._counted = True
        self.metrics.rpc(self.method, code)


def _gone(context) -> str:
    # A client's deadline fires one network latency before the server's (the server's starts when the call
    # arrives), and reaches the server as a cancel; one that ends this close to its deadline ended by it.
    remaining = _remaining(context)
    return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= DEADLINE_SLACK_S else "CANCELLED"


def _abort(context, err: Exception, outcome: _Outcome):
    if isinstance(err, errors.ServiceError):
        code, details = _status_of(err), str(err)
    else:
        log.exception("internal error in %s", context)
        code, details = grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}: {str(err)[:200]}"
    outcome.end(code.name)  # before abort: the client sees the status only after it is counted
    context.abort(code, details)


def _remaining(context) -> float | None:
    """Seconds to the call's deadline; None without one (gRPC then reports a huge number)."""
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining < 1e6 else None


def _unary(method):
    @functools.wraps(method)
    def handler(self, request, context):
        outcome = _Outcome(self.engine.metrics, method.__name__, context)
        try:
            response = method(self, _readable(request), context)
        except Exception as err:  # noqa: BLE001 - every failure becomes a status, never a dead worker
            _abort(context, err, outcome)
        outcome.end("OK")
        return response
    return handler


def _report(report) -> pb.RequestReport:
    quality, plan = report.quality, report.plan
    return pb.RequestReport(
        mode=report.mode, ratio=report.ratio, chunk_ids=report.chunk_ids, scores=report.scores,
        prompt_tokens=report.prompt_tokens, chunk_tokens=report.chunk_tokens, chunks_hit=report.chunks_hit,
        chunks_missing=report.chunks_missing, missing_tokens=report.missing_tokens,
        tokens_recomputed=report.tokens_recomputed, queue_s=report.queue_s, retrieve_s=report.retrieve_s,
        load_s=report.load_s, load_wait_s=report.load_wait_s, compute_s=report.compute_s,
        missing_compute_s=report.missing_compute_s,
        quality=pb.QualityCheck(checked=quality.checked, kl=quality.kl, agree=quality.agree,
                                fell_back=quality.fell_back),
        degraded_tiers=report.degraded_tiers,
        plan=pb.LoadPlan(planned=plan.planned, ratio=plan.ratio, recompute_chunk_ids=plan.recompute_chunk_ids,
                         predicted_load_s=plan.predicted_load_s, predicted_compute_s=plan.predicted_compute_s,
                         reason=plan.reason),
        load_stall_s=report.load_stall_s, stalled_layers=report.stalled_layers,
        chunk_sources=report.chunk_sources, cached_tokens=report.cached_tokens,
        documents=[pb.DocumentReport(chunk_ids=d.chunk_ids, hit=d.hit, chunks_computed=d.chunks_computed)
                   for d in report.documents],
    )


class ChunkCacheServicer(pb_grpc.ChunkCacheServicer):
    def __init__(self, engine, auth: AuthConfig):
        self.engine = engine
        self.tenants = Tenants(auth)

    @_unary
    def IngestChunks(self, request, context):
        from services.serving.requests import DocumentIn

        tenant = self.tenants.of(context)
        documents = [DocumentIn(d.text, d.title, d.doc_id) for d in request.documents]
        # The call is over (client cancel, deadline, network): the engine stops between chunks.
        result = self.engine.ingest(tenant, documents, _remaining(context), lambda: not context.is_active())
        return pb.IngestResponse(
            documents=[pb.IngestedDocument(doc_id=doc_id, chunk_ids=ids)
                       for doc_id, ids in zip(result.doc_ids, result.chunk_ids, strict=True)],
            chunks_added=result.added, chunks_existing=result.existing, kv_computed=result.kv_computed,
            kv_not_stored=result.kv_not_stored, seconds=result.seconds)

    @_unary
    def Retrieve(self, request, context):
        hits = self.engine.retrieve(self.tenants.of(context), request.query, request.k)
        return pb.RetrieveResponse(chunks=[
            pb.RetrievedChunk(chunk_id=h.chunk_id, score=h.score, title=h.title, doc_id=h.doc_id, text=h.text,
                              tokens=h.tokens) for h in hits])

    def Generate(self, request, context):
        from services.serving.requests import DocumentIn, GenerateParams

        outcome = _Outcome(self.engine.metrics, "Generate", context)
        try:
            request = _readable(request)
            tenant = self.tenants.of(context)
            ratio = request.ratio if request.HasField("ratio") else None
            params = GenerateParams(query=request.query, chunk_ids=tuple(request.chunk_ids),
                                    top_k=request.top_k, mode=request.mode, ratio=ratio,
                                    max_new_tokens=request.max_new_tokens,
                                    documents=tuple(DocumentIn(d.text, d.title, d.doc_id) for d in request.documents),
                                    temperature=request.temperature,
                                    top_p=request.top_p if request.HasField("top_p") else None,
                                    seed=request.seed if request.HasField("seed") else None,
                                    stop=tuple(request.stop))
            generation = self.engine.generate(tenant, params, _remaining(context))
        except Exception as err:  # noqa: BLE001
            _abort(context, err, outcome)
        # Called when the RPC ends for any reason: a cancelled or timed-out call stops generating.
        context.add_callback(generation.cancel)
        try:
            for piece in generation:
                message = pb.GenerateResponse(text=piece.text, token_ids=piece.token_ids)
                if piece.report is not None:
                    message.ttft_s = piece.ttft_s
                    message.report.CopyFrom(_report(piece.report))
                if piece.finish is not None:
                    message.finish.CopyFrom(pb.Finish(reason=piece.finish.reason, tokens=piece.finish.tokens,
                                                      seconds=piece.finish.seconds))
                yield message
        except Exception as err:  # noqa: BLE001
            _abort(context, err, outcome)
        outcome.end("OK")

    @_unary
    def DeleteChunks(self, request, context):
        deleted, entries = self.engine.delete(self.tenants.of(context), list(request.chunk_ids))
        return pb.DeleteResponse(deleted=deleted, kv_entries_deleted=entries)

    @_unary
    def Stats(self, request, context):
        stats = self.engine.stats(self.tenants.of(context))
        known = pb.TierStats.DESCRIPTOR.fields_by_name
        tiers = [pb.TierStats(**{k: v for k, v in tier.items() if k in known}) for tier in stats.pop("tiers")]
        guard = pb.GuardStats(**stats.pop("guard"))
        loading = pb.LoadingStats(**stats.pop("loading"))
        warmup = pb.WarmupStats(**stats.pop("warmup"))
        return pb.StatsResponse(tiers=tiers, guard=guard, loading=loading, warmup=warmup, **stats)


class TierHealth:
    """Keeps each tier's health entry in step with whether it answers (pinged every interval), and the
    service's entries NOT_SERVING once a chunk store is lost (checked at the same interval)."""

    def __init__(self, engine, servicer: health.HealthServicer, interval_s: float):
        self.engine = engine
        self.servicer = servicer
        self.interval_s = interval_s
        self.serving = False  # set by the server once it takes calls
        self._stop = threading.Event()
        self.update(engine.tier_availability())
        self._thread = threading.Thread(target=self._run, name="tier-health", daemon=True)
        self._thread.start()

    def update(self, availability: dict[str, bool]) -> None:
        for name, up in availability.items():
            self.servicer.set(tier_health_name(name), SERVING if up else NOT_SERVING)
        lost = self.engine.lost_stores()
        self.servicer.set(CATALOG_HEALTH, NOT_SERVING if lost else SERVING)
        if lost and self.serving:
            self.serving = False
            log.error("%d chunk store(s) deleted or replaced while open; health is NOT_SERVING until the server "
                      "restarts", lost)
            for name in ("", SERVICE):
                self.servicer.set(name, NOT_SERVING)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.update(self.engine.probe_tiers())
            except Exception:  # noqa: BLE001 - health must keep running
                log.exception("tier health probe failed")

    def stop(self) -> None:
        self._stop.set()


class OrphanSweep:
    """Deletes orphaned layer entries (no manifest in any tier, idle `idle_s` or more on disk or in Redis) at
    start-up and then every `idle_s` (`ChunkStore.sweep_orphans`); `idle_s` 0 never sweeps."""

    def __init__(self, engine, idle_s: float):
        self.engine = engine
        self.idle_s = idle_s
        self._stop = threading.Event()
        if idle_s:
            threading.Thread(target=self._run, name="orphan-sweep", daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                swept = self.engine.store.sweep_orphans(self.idle_s)
                if swept:
                    log.warning("swept %d orphaned layer entries (no manifest, idle %.0f s or more)", swept,
                                self.idle_s)
            except Exception:  # noqa: BLE001 - a failed sweep is tried again at the next interval
                log.exception("orphan sweep failed")
            if self._stop.wait(self.idle_s):
                return

    def stop(self) -> None:
        self._stop.set()


class Server:
    """The gRPC server around an engine: ChunkCache, health and reflection on one port."""

    def __init__(self, engine, settings: ServeSettings):
        self.engine = engine
        self.settings = settings
        config = settings.server
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   # Connections are closed (gracefully) after a while, so round-robin clients resolve
                   # their DNS name again and find replicas started since.
                   ("grpc.max_connection_age_ms", MAX_CONNECTION_AGE_MS),
                   ("grpc.max_connection_age_grace_ms", MAX_CONNECTION_AGE_GRACE_MS)]
        pool = ThreadPoolExecutor(config.rpc_threads, thread_name_prefix="rpc")
        self.grpc = grpc.server(pool, options=options)
        add_chunk_cache(ChunkCacheServicer(engine, settings.auth), self.grpc)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        names = (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.grpc)
        if settings.tls.enabled:
            pair = (settings.tls.key.read_bytes(), settings.tls.cert.read_bytes())
            credentials = grpc.ssl_server_credentials([pair])
            self.port = self.grpc.add_secure_port(config.address, credentials)
        else:
            self.port = self.grpc.add_insecure_port(config.address)
        if not self.port:
            raise OSError(f"cannot listen on {config.address}")
        self.tier_health = TierHealth(engine, self.health, config.health_interval_s)
        self.orphan_sweep = OrphanSweep(engine, config.orphan_idle_s)
        self.metrics = None  # the Prometheus endpoint, while one is served
        self.http = None  # the OpenAI-compatible HTTP API, while one is served

    def start(self) -> None:
        self.grpc.start()
        for name in ("", SERVICE):
            self.health.set(name, SERVING)
        self.tier_health.serving = True
        config = self.settings.server
        if config.metrics_port:
            from services.serving import prometheus

            tls = self.settings.tls
            pair = (str(tls.cert), str(tls.key)) if config.metrics_tls else None
            self.metrics = prometheus.start(self.engine, config.metrics_host, config.metrics_port, pair)
        if config.http_port:
            from services.serving.openai_http import HTTPServer

            self.http = HTTPServer(self.engine, self.settings.auth, self.settings.model.spec, config.host,
                                   config.http_port, self.settings.tls)
            self.http.start()

    def drain(self) -> None:
        """Refuse new calls, let in-flight ones finish (up to `drain_s`), then stop the engine."""
        grace = self.settings.server.drain_s
        self.engine.draining = True
        self.health.enter_graceful_shutdown()
        self.tier_health.stop()
        self.orphan_sweep.stop()
        if self.http is not None:  # refuses new connections now; its in-flight requests finish below
            self.http.server.should_exit = True
        self.grpc.stop(grace).wait()
        if self.http is not None:
            self.http.close(grace)
        self.engine.close()
        if self.metrics is not None:  # scraped until here, so the drain itself shows
            self.metrics.close()


def serve(settings: ServeSettings) -> int:
    from services.serving.engine import Engine

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    engine = Engine.open(settings)
    server = Server(engine, settings)
    # Start-up's objects (model, tokenizer, retriever: ~400,000) out of the collector's reach: a full collection in a
    # request's thread would otherwise walk them all (services/serving/gc_pauses.py).
    frozen = gc_pauses.freeze_start_up()
    server.start()
    scheme = "tls" if settings.tls.enabled else "plaintext"
    catalog = "shared through Redis" if settings.server.catalog == "redis" else "local"
    print(f"kvblend: serving {settings.model.spec} on {settings.server.host}:{server.port} ({scheme}, "
          f"auth {'on' if settings.auth.enabled else 'off'}, catalog {catalog}, tiers "
          f"{', '.join(t.name for t in engine.store.tiered.tiers)}; {frozen} start-up objects frozen for the "
          f"garbage collector)", flush=True)
    if server.metrics is not None:
        scheme = "https" if settings.server.metrics_tls else "http"
        print(f"kvblend: metrics on {scheme}://{settings.server.metrics_url_host}:{server.metrics.port}/metrics",
              flush=True)
    if server.http is not None:
        print(f"kvblend: OpenAI-compatible HTTP on {server.http.scheme}://{settings.server.url_host}:"
              f"{server.http.port}/v1",
              flush=True)
    stop.wait()
    print("kvblend: draining in-flight requests", flush=True)
    server.drain()
    print("kvblend: stopped", flush=True)
    return 0
