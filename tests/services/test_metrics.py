"""Prometheus metrics: the collector over a light engine's counters, and /metrics of a real `kvblend serve`."""

from __future__ import annotations

import gc
import json
import socket
import time
import urllib.request
import uuid
from types import SimpleNamespace

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from tests.helpers.service import DOCUMENTS, ServerProcess, delete_redis_prefix, status_of
from tests.helpers.kv import REDIS_URL

from services.serving import prometheus
from services.serving.gc_pauses import Pauses
from services.serving.metrics import Metrics
from store.memory_tier import MemoryTier
from store.redis_tier import RedisTier
from store.tiered import TieredStore
from store.warmup import WarmupStats


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens here once the socket is closed


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics: (sample name, labels) -> value."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, frozenset(labels.items())))


# -- the collector over a light engine -------------------------------------------------------------

class Worker:
    def __init__(self):
        self.waiting = self.active = 0

    def depth(self) -> tuple[int, int]:
        return self.waiting, self.active

    def kv_bytes(self) -> tuple[int, int]:
        return 0, 0


def light_engine(tiers, budgets) -> SimpleNamespace:
    """What the collector reads of an engine: metrics, store.tiered, worker.depth() and kv_bytes(),
    tier_availability(), warmup_stats(), pool_stats()."""
    tiered = TieredStore(tiers, budgets)
    return SimpleNamespace(metrics=Metrics(), store=SimpleNamespace(tiered=tiered), worker=Worker(), gc=_NoPauses(),
                           tier_availability=lambda: {t.name: getattr(t, "available", True) for t in tiers},
                           warmup_stats=WarmupStats,
                           pool_stats=lambda: {"kv_pool_bytes": 1 << 30, "kv_pool_free_bytes": 3 << 28, "kv_pool_misses": 2})


class _NoPauses:
    """An engine's garbage-collector counters before any collection (`Pauses` without its process-wide callback)."""

    def snapshot(self) -> dict:
        return {"collections": [0, 0, 0], "seconds": [0.0, 0.0, 0.0], "longest_s": 0.0, "frozen": 0}


def test_garbage_collections_and_their_pauses_are_reported_by_generation(serve):
    engine = light_engine([MemoryTier("cpu")], [1 << 20])
    engine.gc = Pauses()
    try:
        gc.collect(2)
        samples = scrape(serve(engine))
    finally:
        engine.gc.close()
    assert value(samples, "kvblend_gc_collections_total", generation="2") >= 1
    assert value(samples, "kvblend_gc_pause_seconds_total", generation="2") > 0
    assert value(samples, "kvblend_gc_collections_total", generation="0") is not None
    assert value(samples, "kvblend_gc_longest_pause_seconds") > 0
    assert value(samples, "kvblend_gc_frozen_objects") == gc.get_freeze_count()


def never(*_):
    raise AssertionError("a scrape asked a tier for its size (a Redis SCAN or a disk walk)")


@pytest.fixture
def redis_prefix():
    prefix = f"kvblend-metrics-test-{uuid.uuid4().hex}:"
    yield prefix
    delete_redis_prefix(prefix)


@pytest.fixture
def serve():
    servers = []

    def start(engine) -> str:
        servers.append(prometheus.start(engine, "127.0.0.1", 0))
        return f"http://127.0.0.1:{servers[-1].port}/metrics"

    yield start
    for server in servers:
        server.close()


def test_ttft_histogram_buckets_are_cumulative_with_sum_and_count(serve):
    engine = light_engine([MemoryTier("cpu")], [1 << 20])
    for ttft in (0.03, 0.3, 100.0):
        engine.metrics.first_token(ttft)
    samples = scrape(serve(engine))
    buckets = {le: value(samples, "kvblend_ttft_seconds_bucket", le=le) for le in ("0.05", "0.25", "0.5", "60.0",
                                                                                    "+Inf")}
    assert buckets == {"0.05": 1, "0.25": 1, "0.5": 2, "60.0": 2, "+Inf": 3}
    assert value(samples, "kvblend_ttft_seconds_count") == 3
    assert value(samples, "kvblend_ttft_seconds_sum") == pytest.approx(100.33)


def test_the_replica_warm_up_reports_its_queue_and_what_it_pulled(serve):
    engine = light_engine([MemoryTier("cpu")], [1 << 20])
    engine.warmup_stats = lambda: WarmupStats(queue=3, chunks=2, bytes=4096, skipped=1, misses=5)
    samples = scrape(serve(engine))
    assert value(samples, "kvblend_warmup_queue") == 3
    assert {field: value(samples, f"kvblend_warmup_{field}_total") for field in prometheus.WARMUP_COUNTERS} == {
        "chunks": 2, "bytes": 4096, "skipped": 1, "misses": 5}


def test_rpcs_outcomes_tokens_and_queue_are_reported_by_label(serve):
    engine = light_engine([MemoryTier("cpu")], [1 << 20])
    metrics = engine.metrics
    for method, code in [("Generate", "OK"), ("Generate", "OK"), ("Retrieve", "INVALID_ARGUMENT")]:
        metrics.rpc(method, code)
    metrics.ended()
    metrics.ended(failed=True)
    metrics.ended(failed=True)
    metrics.ended(cancelled=True)
    metrics.reject()
    for _ in range(5):
        metrics.token()
    engine.worker.waiting, engine.worker.active = 3, 1
    samples = scrape(serve(engine))
    assert value(samples, "kvblend_rpcs_total", method="Generate", code="OK") == 2
    assert value(samples, "kvblend_rpcs_total", method="Retrieve", code="INVALID_ARGUMENT") == 1
    outcomes = {o: value(samples, "kvblend_generate_requests_total", outcome=o)
                for o in ("completed", "failed", "cancelled", "rejected")}
    assert outcomes == {"completed": 1, "failed": 2, "cancelled": 1, "rejected": 1}
    assert value(samples, "kvblend_tokens_generated_total") == 5
    assert value(samples, "kvblend_queue_depth") == 3 and value(samples, "kvblend_active_requests") == 1
    assert value(samples, "kvblend_kv_pool_bytes") == 1 << 30 and value(samples, "kvblend_kv_pool_free_bytes") == 3 << 28
    assert value(samples, "kvblend_kv_pool_misses_total") == 2


def test_tier_counters_and_bytes_come_from_the_store_without_measuring_a_tier(serve, redis_prefix, monkeypatch):
    entry = torch.ones(256)  # 1 KiB: the CPU tier's budget holds exactly one
    cpu, redis_tier = MemoryTier("cpu"), RedisTier(REDIS_URL, prefix=redis_prefix)
    engine = light_engine([cpu, redis_tier], [entry.nbytes, None])
    tiered = engine.store.tiered
    tiered.put("a", entry)
    tiered.put("b", entry)  # evicts a down to Redis
    tiered.note_use("a")  # used more often than b: promotion may evict it
    assert tiered.get("a") is not None  # a Redis hit, promoted back up (evicting b)
    assert tiered.get("c") is None
    for tier in (cpu, redis_tier):
        monkeypatch.setattr(tier, "bytes_used", never)
        monkeypatch.setattr(tier, "entries", never)
    samples = scrape(serve(engine))
    counts = {(field, tier): value(samples, f"kvblend_tier_{field}_total", tier=tier)
              for field in prometheus.TIER_COUNTERS for tier in ("cpu", "redis")}
    assert counts == {
        ("hits", "cpu"): 0, ("hits", "redis"): 1, ("misses", "cpu"): 2, ("misses", "redis"): 1,
        ("evictions", "cpu"): 2, ("evictions", "redis"): 0, ("corrupt", "cpu"): 0, ("corrupt", "redis"): 0,
        ("promotions", "cpu"): 1, ("promotions", "redis"): 0, ("demotions", "cpu"): 0, ("demotions", "redis"): 2,
    }
    assert value(samples, "kvblend_tier_bytes", tier="cpu") == entry.nbytes == tiered.usage()["cpu"]
    assert value(samples, "kvblend_tier_bytes", tier="redis") is None  # unbudgeted: its server's memory instead
    assert value(samples, "kvblend_redis_used_memory_bytes", tier="redis") > 0
    assert value(samples, "kvblend_tier_up", tier="redis") == 1
    assert value(samples, "kvblend_skipped_writes_total", tier="redis") == 0


def test_a_down_redis_is_reported_down_without_failing_the_scrape(serve):
    redis_tier = RedisTier(f"redis://127.0.0.1:{_free_port()}/0", timeout_s=0.2, retry_s=60)
    engine = light_engine([MemoryTier("cpu"), redis_tier], [1, None])
    assert not engine.store.tiered.put("a", torch.ones(4))  # over the CPU budget, and Redis skips it
    samples = scrape(serve(engine))
    assert value(samples, "kvblend_tier_up", tier="redis") == 0
    assert value(samples, "kvblend_tier_up", tier="cpu") == 1
    assert value(samples, "kvblend_redis_used_memory_bytes", tier="redis") is None
    assert value(samples, "kvblend_skipped_writes_total", tier="redis") == redis_tier.skipped_writes >= 1
    assert value(samples, "kvblend_skipped_writes_total", tier="cpu") == 0


def test_a_closed_metrics_server_no_longer_answers():
    server = prometheus.start(light_engine([MemoryTier("cpu")], [1]), "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.port}/metrics"
    assert value(scrape(url), "kvblend_queue_depth") == 0
    server.close()
    with pytest.raises(OSError):
        scrape(url)


# -- through a real server --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(service_model_dir, tmp_path_factory):
    """A CPU tier of one byte (room for no entry, so chunks are read from Redis) over Redis,
    metrics on a free port given by the flag."""
    prefix = f"kvblend-metrics-test-{uuid.uuid4().hex}:"
    port = _free_port()
    server = ServerProcess(tmp_path_factory.mktemp("metrics-server"), service_model_dir, {
        "server": {"chunk_tokens": 128, "max_new_tokens": 1000, "default_max_new_tokens": 8},
        "store": {"disk_path": "", "cpu_bytes": 1, "redis_url": REDIS_URL, "redis_prefix": prefix},
    }, flags=("--metrics-port", str(port)))
    server.metrics_url = f"http://127.0.0.1:{port}/metrics"
    yield server
    code = server.stop()
    delete_redis_prefix(prefix)
    assert code == 0, server.stderr()[-3000:]


@pytest.fixture(scope="module")
def chunk_ids(client):
    return [d.chunk_ids[0] for d in client.ingest(DOCUMENTS).documents]


def delta(before: dict, after: dict, name: str, **labels) -> float:
    return (value(after, name, **labels) or 0) - (value(before, name, **labels) or 0)


def wait_for(url: str, condition, timeout: float = 30.0) -> dict:
    """Scrape until `condition(samples)` holds: a call that ends by cancellation is counted when gRPC reports
    its end, a moment after the client gave up."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        if condition(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def test_serve_prints_the_metrics_address(server):
    assert f"kvblend: metrics on {server.metrics_url}\n" in server.output(timeout=2)


def test_a_served_process_freezes_its_start_up_objects_and_counts_its_collections(server):
    """`kvblend serve` moves start-up's objects out of the collector's walks and says how many; the metrics show them
    and every collection since, by generation."""
    frozen = int(server.serving_line.split(" start-up objects frozen")[0].rsplit(" ", 1)[1])
    samples = scrape(server.metrics_url)
    # (Frozen objects still go when nothing refers to them: the count only falls after start-up.)
    assert 10_000 < value(samples, "kvblend_gc_frozen_objects") <= frozen
    for generation in "012":
        assert value(samples, "kvblend_gc_collections_total", generation=generation) >= 0
        assert value(samples, "kvblend_gc_pause_seconds_total", generation=generation) >= 0


def test_calls_are_counted_by_method_and_status_with_ttft_and_tiers(server, client, chunk_ids, service_model_dir):
    before = scrape(server.metrics_url)
    assert value(before, "kvblend_rpcs_total", method="IngestChunks", code="OK") == 1
    answer = client.answer("Where is Everest?", chunk_ids=chunk_ids[1:3], mode="reuse", max_new_tokens=3)
    assert answer.finish.tokens == 3
    code, _ = status_of(lambda: client.generate("Where?", chunk_ids=chunk_ids[:1], ratio=2.0))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, _ = status_of(lambda: client.retrieve("   ", k=1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    after = scrape(server.metrics_url)
    assert delta(before, after, "kvblend_rpcs_total", method="Generate", code="OK") == 1
    assert delta(before, after, "kvblend_rpcs_total", method="Generate", code="INVALID_ARGUMENT") == 1
    assert delta(before, after, "kvblend_rpcs_total", method="Retrieve", code="INVALID_ARGUMENT") == 1
    assert delta(before, after, "kvblend_ttft_seconds_count") == 1
    assert delta(before, after, "kvblend_generate_requests_total", outcome="completed") == 1
    assert delta(before, after, "kvblend_tokens_generated_total") == 3
    # 3 tokens: the first from the prefill, then two decode steps, each timed on the model thread
    assert delta(before, after, "kvblend_decode_steps_total") == 2
    assert delta(before, after, "kvblend_decode_step_seconds_total") > 0
    assert client.stats().decode_step_seconds > 0
    # Tier counters count store entries: a chunk is a manifest and one entry per layer. No entry fits this server's
    # CPU tier, so each of its entries is a CPU miss and a Redis hit.
    layers = json.loads((service_model_dir / "config.json").read_text())["num_hidden_layers"]
    assert delta(before, after, "kvblend_tier_misses_total", tier="cpu") == 2 * (1 + layers)
    assert delta(before, after, "kvblend_tier_hits_total", tier="redis") == 2 * (1 + layers)
    assert value(after, "kvblend_tier_up", tier="redis") == 1
    assert value(after, "kvblend_redis_used_memory_bytes", tier="redis") > 0
    assert value(after, "kvblend_queue_depth") == 0


def test_a_running_generate_is_active_and_a_cancelled_one_counts_as_cancelled(server, client, chunk_ids):
    idle = wait_for(server.metrics_url, lambda s: value(s, "kvblend_active_requests") == 0)
    stream = client.generate("Tell me everything.", chunk_ids=chunk_ids, mode="full", max_new_tokens=900)
    next(stream)
    running = scrape(server.metrics_url)
    assert value(running, "kvblend_active_requests") == 1
    stream.cancel()
    # The RPC, the worker's active count and the request outcome are each updated by their own thread.
    ended = wait_for(server.metrics_url, lambda s: value(s, "kvblend_active_requests") == 0 and delta(
        idle, s, "kvblend_rpcs_total", method="Generate", code="CANCELLED") == 1 and delta(
        idle, s, "kvblend_generate_requests_total", outcome="cancelled") == 1)
    assert delta(idle, ended, "kvblend_rpcs_total", method="Generate", code="CANCELLED") == 1
    assert delta(idle, ended, "kvblend_rpcs_total", method="Generate", code="OK") == 0
    assert delta(idle, ended, "kvblend_generate_requests_total", outcome="cancelled") == 1
    assert value(ended, "kvblend_active_requests") == 0


def test_a_generate_past_its_deadline_counts_as_deadline_exceeded(server, client, chunk_ids):
    before = wait_for(server.metrics_url, lambda s: value(s, "kvblend_active_requests") == 0)
    code, _ = status_of(lambda: client.generate("Go on.", chunk_ids=chunk_ids, max_new_tokens=900, timeout=0.3))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    after = wait_for(server.metrics_url, lambda s: delta(
        before, s, "kvblend_rpcs_total", method="Generate", code="DEADLINE_EXCEEDED") == 1)
    assert delta(before, after, "kvblend_rpcs_total", method="Generate", code="DEADLINE_EXCEEDED") == 1
    assert delta(before, after, "kvblend_rpcs_total", method="Generate", code="CANCELLED") == 0
