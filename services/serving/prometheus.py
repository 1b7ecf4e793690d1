"""Prometheus metrics of a running engine over HTTP (`kvblend serve --metrics-port N`).

The collector reads the engine's own counters at each scrape, so nothing on the request path knows
about Prometheus. It never asks a tier for its size (a Redis SCAN or a disk walk): tier bytes come from
the store's LRU accounting, and Redis reports its server-wide `used_memory` instead. docs/operations.md
lists the metric names; they are an interface, keep them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_wsgi_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from services.serving.metrics import TTFT_BUCKETS_S

TIER_COUNTERS = {  # TierStats field -> HELP of kvblend_tier_<field>_total
    "hits": "KV reads answered by this tier",
    "misses": "KV reads this tier did not answer (corrupt entries included)",
    "evictions": "entries pushed out of this tier by its byte budget",
    "corrupt": "entries that failed their checksum (deleted and counted as misses)",
    "promotions": "entries copied into this tier from a tier below on a hit",
    "demotions": "entries moved into this tier from the tier above on an eviction",
}

WARMUP_COUNTERS = {  # WarmupStats field -> HELP of kvblend_warmup_<field>_total
    "chunks": "chunks the replica warm-up pulled from Redis into the CPU tier",
    "bytes": "bytes the replica warm-up pulled from Redis into the CPU tier",
    "skipped": "chunks the replica warm-up found in the CPU tier already",
    "misses": "chunks the replica warm-up could not read from Redis (absent, down or corrupt)",
}


class EngineCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        engine, tiered = self.engine, self.engine.store.tiered
        snapshot = engine.metrics.snapshot()

        rpcs = CounterMetricFamily("kvblend_rpcs", "gRPC calls ended, by method and status code",
                                   labels=["method", "code"])
        for (method, code), count in sorted(snapshot["rpcs"].items()):
            rpcs.add_metric([method, code], count)
        yield rpcs

        requests = CounterMetricFamily("kvblend_generate_requests", "Generate requests admitted to the queue "
                                       "that ended, by outcome, and those refused (rejected)", labels=["outcome"])
        for outcome in ("completed", "failed", "cancelled", "rejected"):
            requests.add_metric([outcome], snapshot[outcome])
        yield requests

        cumulative, buckets = 0, []
        for bound, count in zip((*TTFT_BUCKETS_S, float("inf")), snapshot["ttft_counts"], strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        yield HistogramMetricFamily("kvblend_ttft_seconds", "time to the first token of Generate requests",
                                    buckets=buckets, sum_value=snapshot["ttft_sum"])
        yield CounterMetricFamily("kvblend_tokens_generated", "tokens generated", value=snapshot["tokens_generated"])
        yield CounterMetricFamily("kvblend_decode_steps", "decode forwards run (one per batched step)",
                                  value=snapshot["decode_steps"])
        yield CounterMetricFamily("kvblend_decode_step_tokens", "tokens fed to decode forwards (over steps: the "
                                  "mean batch)", value=snapshot["decode_step_tokens"])
        yield CounterMetricFamily("kvblend_decode_step_seconds", "the model thread's time in decode steps, their "
                                  "tokens' emits included (over steps: the mean step)",
                                  value=snapshot["decode_step_seconds"])

        counters = tiered.counters()
        for field, help_text in TIER_COUNTERS.items():
            family = CounterMetricFamily(f"kvblend_tier_{field}", help_text, labels=["tier"])
            for name, stats in counters.items():
                family.add_metric([name], getattr(stats, field))
            yield family

        skipped = CounterMetricFamily("kvblend_skipped_writes", "KV writes a tier dropped (Redis down or refusing)",
                                      labels=["tier"])
        used = GaugeMetricFamily("kvblend_tier_bytes", "bytes this tier holds, by the store's LRU accounting "
                                 "(budgeted tiers only; see kvblend_redis_used_memory_bytes)", labels=["tier"])
        for tier, size in zip(tiered.tiers, tiered.usage().values(), strict=True):
            skipped.add_metric([tier.name], tier.skipped_writes)
            if size is not None:
                used.add_metric([tier.name], size)
        yield skipped
        yield used

        redis_memory = GaugeMetricFamily("kvblend_redis_used_memory_bytes", "INFO memory used_memory of the Redis "
                                         "server behind this tier: the whole server, other keys included",
                                         labels=["tier"])
        for tier in tiered.tiers:
            # A down Redis leaves the value out rather than failing the scrape.
            value = tier.used_memory() if hasattr(tier, "used_memory") else None
            if value is not None:
                redis_memory.add_metric([tier.name], value)
        yield redis_memory

        up = GaugeMetricFamily("kvblend_tier_up", "1 while the tier answers, 0 while it is down (Redis)",
                               labels=["tier"])
        for name, available in engine.tier_availability().items():
            up.add_metric([name], 1 if available else 0)
        yield up

        pauses = engine.gc.snapshot()
        collections = CounterMetricFamily("kvblend_gc_collections", "Python garbage collections, by generation",
                                          labels=["generation"])
        seconds = CounterMetricFamily("kvblend_gc_pause_seconds", "seconds the process stood in Python garbage "
                                      "collections (the thread that ran one waited), by generation",
                                      labels=["generation"])
        for generation, (count, spent) in enumerate(zip(pauses["collections"], pauses["seconds"], strict=True)):
            collections.add_metric([str(generation)], count)
            seconds.add_metric([str(generation)], spent)
        yield collections
        yield seconds
        yield GaugeMetricFamily("kvblend_gc_longest_pause_seconds", "the longest Python garbage collection so far",
                                value=pauses["longest_s"])
        yield GaugeMetricFamily("kvblend_gc_frozen_objects", "objects start-up left out of the collector's walks "
                                "(gc.freeze)", value=pauses["frozen"])

        waiting, active = engine.worker.depth()
        yield GaugeMetricFamily("kvblend_queue_depth", "Generate requests queued, not started yet", value=waiting)
        yield GaugeMetricFamily("kvblend_active_requests", "Generate requests started and not ended", value=active)
        held, kv_waiting = engine.worker.kv_bytes()
        yield GaugeMetricFamily("kvblend_kv_bytes_active", "KV buffer bytes of the requests being generated "
                                "(counted with server.max_kv_bytes set)", value=held)
        yield GaugeMetricFamily("kvblend_waiting_for_kv", "queued requests waiting for KV room", value=kv_waiting)
        pool = engine.pool_stats()
        yield GaugeMetricFamily("kvblend_kv_pool_bytes", "the KV pool request buffers are ranges of (CUDA; 0: none)",
                                value=pool["kv_pool_bytes"])
        yield GaugeMetricFamily("kvblend_kv_pool_free_bytes", "of the KV pool, bytes free now",
                                value=pool["kv_pool_free_bytes"])
        yield CounterMetricFamily("kvblend_kv_pool_misses", "KV buffers the pool had no free range for "
                                  "(allocated outside it; their decode takes the slower gathered path)",
                                  value=pool["kv_pool_misses"])

        warmup = engine.warmup_stats()
        yield GaugeMetricFamily("kvblend_warmup_queue", "chunks other replicas added that the warm-up has not "
                                "pulled into the CPU tier yet", value=warmup.queue)
        for field, help_text in WARMUP_COUNTERS.items():
            yield CounterMetricFamily(f"kvblend_warmup_{field}", help_text, value=getattr(warmup, field))


class MetricsServer:
    """The HTTP endpoint (/metrics and /) on its own threads, over a registry of its own."""

    def __init__(self, engine, host: str, port: int, tls: tuple[str, str] | None = None):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(EngineCollector(engine))
        certfile, keyfile = tls if tls is not None else (None, None)
        self._http, self._thread = start_wsgi_server(port, host, self.registry, certfile=certfile, keyfile=keyfile)
        self.port = self._http.server_port

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join()


def start(engine, host: str, port: int, tls: tuple[str, str] | None = None) -> MetricsServer:
    """Serve `engine`'s metrics on host:port (0 picks a free port: see `.port`); over HTTPS with
    `tls` = (certificate file, key file)."""
    return MetricsServer(engine, host, port, tls)
