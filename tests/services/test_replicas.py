"""Replicas sharing one Redis: what one ingests the other blends from Redis; faults under load lose nothing.

Each test starts a redis-server of its own (append-only file on) and real `kvblend serve --catalog redis`
processes on the tiny model, or (the outage report) one engine with `--catalog redis`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pytest
import redis
from tests.helpers.model import CACHE_DIR
from tests.helpers.service import DOCUMENTS

from services.bench.cluster import Cluster
from services.bench.launch import RedisProcess
from services.client import Client
from services.commands.bench import cmd_bench_cluster
from services.serving.engine import Engine
from services.serving.errors import Overloaded, Unavailable
from services.serving.requests import DocumentIn
from services.settings import DEFAULT_TENANT, build

ROOT = Path(__file__).resolve().parents[2]
SERVER = {"chunk_tokens": 128, "default_max_new_tokens": 8}
WARMUP_INTERVAL_S = 0.2
WARMUP_BOUND_S = 60.0  # generous: two replicas and pytest share two cores; the measured delay is printed


@pytest.fixture
def warm_cluster(service_model_dir, tmp_path):
    cluster = Cluster(tmp_path, str(service_model_dir), 2, str(CACHE_DIR),
                      {"server": {**SERVER, "warmup_interval_s": WARMUP_INTERVAL_S}})
    yield cluster
    cluster.close()


@pytest.fixture
def cluster(service_model_dir, tmp_path):
    # Warm-up off: these tests are about reading another replica's chunks from Redis.
    cluster = Cluster(tmp_path, str(service_model_dir), 2, str(CACHE_DIR),
                      {"server": {**SERVER, "warmup_interval_s": 0}})
    yield cluster
    cluster.close()


def test_a_chunk_ingested_through_one_replica_is_blended_by_the_other_from_redis(cluster):
    a, b = (Client(f"127.0.0.1:{port}") for port in cluster.ports)
    with a, b:
        ids = [cid for doc in a.ingest(DOCUMENTS).documents for cid in doc.chunk_ids]
        answer_b = b.answer("What is the capital of France?", chunk_ids=ids, mode="blend", max_new_tokens=6)
        report = answer_b.report
        assert dict(report.chunks_hit) == {"redis": len(ids)} and report.chunks_missing == 0
        assert report.tokens_recomputed > 0  # blended: the HKVD tokens only, from cached KV
        answer_a = a.answer("What is the capital of France?", chunk_ids=ids, mode="blend", max_new_tokens=6)
        assert answer_b.token_ids == answer_a.token_ids
        found = b.retrieve("Which river flows through Paris?", k=1).chunks
        assert found[0].title == "Paris" and found[0].chunk_id in ids
        again = b.ingest(DOCUMENTS[:1])  # b knows the chunk too: nothing is computed or written
        assert (again.chunks_existing, again.chunks_added, again.kv_computed) == (1, 0, 0)


def test_a_chunk_ingested_through_one_replica_reaches_the_others_cpu_tier_with_no_request_to_it_and_leaves_on_delete(warm_cluster):
    a = Client(f"127.0.0.1:{warm_cluster.ports[0]}")
    b = Client(f"127.0.0.1:{warm_cluster.ports[1]}")
    # B is watched through Stats of a tenant that holds nothing: it reads B's counters without bringing B's
    # copy of the default tenant's catalog up to date, which only B's own warm-up thread may do here.
    watch_b = Client(f"127.0.0.1:{warm_cluster.ports[1]}", tenant="observer")
    with a, b, watch_b:
        before = watch_b.stats()
        assert before.warmup.enabled and before.warmup.chunks == 0 and before.requests == 0
        ids = [cid for doc in a.ingest(DOCUMENTS).documents for cid in doc.chunk_ids]
        ingested = time.monotonic()
        while True:
            stats = watch_b.stats()
            if stats.warmup.chunks >= len(ids) or time.monotonic() - ingested > WARMUP_BOUND_S:
                break
            time.sleep(0.05)
        delay = time.monotonic() - ingested
        print(f"warm-up: {stats.warmup.chunks} of {len(ids)} chunks in B's CPU tier {delay:.2f} s after A's "
              "ingest returned")
        assert stats.warmup.chunks == len(ids), f"B warmed {stats.warmup.chunks} of {len(ids)} chunks in {delay:.1f} s"
        assert (stats.warmup.queue, stats.warmup.misses) == (0, 0) and stats.warmup.bytes > 0
        tiers = {tier.name: tier for tier in stats.tiers}
        assert tiers["cpu"].bytes == stats.warmup.bytes and tiers["redis"].hits == 0
        assert stats.requests == 0  # nothing was asked of B but Stats
        answer = b.answer("What is the capital of France?", chunk_ids=ids, mode="blend", max_new_tokens=6)
        assert dict(answer.report.chunks_hit) == {"cpu": len(ids)} and answer.report.chunks_missing == 0
        after = {tier.name: tier for tier in watch_b.stats().tiers}
        assert after["redis"].hits == 0  # the request read nothing from Redis
        assert answer.token_ids == a.answer("What is the capital of France?", chunk_ids=ids, mode="blend",
                                            max_new_tokens=6).token_ids
        a.delete(ids)  # deleted through A: B drops its copies when it reads the log, again without a request
        deadline = time.monotonic() + WARMUP_BOUND_S
        while (cpu := {t.name: t for t in watch_b.stats().tiers}["cpu"]).bytes and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cpu.bytes == 0


def test_under_load_a_redis_restart_and_a_killed_replica_lose_nothing_and_fail_nothing(service_model_dir,
                                                                                      tmp_path):
    args = argparse.Namespace(
        dataset=str(ROOT / "data" / "musique_sample.json"), model=str(service_model_dir), cache_dir=str(CACHE_DIR),
        replicas=2, clients=8, duration=24.0, questions=2, top_k=2, max_new_tokens=4, ingest_every=3,
        faults=True, retries=60, retry_wait=0.5, timeout=None, keep=False, json_out=str(tmp_path / "run.json"))
    code = cmd_bench_cluster(args)
    result = json.loads((tmp_path / "run.json").read_text())["result"]
    assert result["failed_rpcs"] == 0, result["failures"]
    assert set(result["failed_attempts_by_code"]) <= {"UNAVAILABLE"}  # and each of those succeeded on retry
    assert result["ingest_ok"] > 0 and result["generate_ok"] > 0
    assert result["redis"]["chunks_checked"] > result["ingest_ok"]  # the setup chunks and every load ingest
    assert result["redis"]["chunks_lost"] == []
    assert [f["fault"].split()[0] for f in result["faults"]] == ["redis", "replica"]
    assert result["replica_back"] is True
    assert code == 0


def test_kvblend_ingest_with_server_sends_a_dataset_to_the_replicas_round_robin(cluster, capsys):
    from services.commands.cli import main

    dataset = ROOT / "data" / "musique_sample.json"
    assert main(["ingest", "--server", cluster.target, "--dataset", str(dataset), "--limit", "3",
                 "--batch-size", "1"]) == 0
    assert "3 documents sent" in capsys.readouterr().out
    first = json.loads(dataset.read_text())[0]["ctxs"][0]
    with Client(f"127.0.0.1:{cluster.ports[1]}") as b:  # every replica knows all three
        found = b.retrieve(first["text"][:200], k=1).chunks
    assert found[0].title == first["title"]


@pytest.mark.parametrize("failure, reported", [
    (redis.ConnectionError("Error 111 connecting to 127.0.0.1: Connection refused."), Unavailable),
    (redis.exceptions.OutOfMemoryError("OOM command not allowed when used memory > 'maxmemory'."), Overloaded),
])
def test_a_replica_reports_a_lost_kv_write_by_its_own_failure_not_by_redis_health_a_moment_later(
        failure, reported, service_model_dir, tmp_path, monkeypatch):
    """During a Redis restart a write fails to connect; the health probe (or any other thread's call) may find
    Redis back before the ingest reports the failure. The report is UNAVAILABLE (retried by clients) all the
    same; only a write Redis answered and refused (out of memory) is RESOURCE_EXHAUSTED."""
    server = RedisProcess()
    server.start()
    try:
        settings = build({"server": {**SERVER, "catalog": "redis"},
                          "store": {"disk_path": "", "redis_url": server.url}},
                         {"spec": str(service_model_dir), "cache_dir": str(CACHE_DIR), "data_dir": str(tmp_path),
                          "device": "cpu"})
        engine = Engine.open(settings)
        try:
            tier = engine.store.tiered.tiers[-1]

            def set_fails(*args, **kwargs):
                raise failure

            monkeypatch.setattr(tier.client, "set", set_fails)
            put = engine.store.put

            def put_then_probe(key, chunk):
                stored = put(key, chunk)
                assert engine.probe_tiers()["redis"]  # the probe runs before the ingest reports; Redis answers
                return stored

            monkeypatch.setattr(engine.store, "put", put_then_probe)
            with pytest.raises(reported) as raised:
                engine.ingest(DEFAULT_TENANT, [DocumentIn(**DOCUMENTS[0])])
            assert type(raised.value) is reported
        finally:
            engine.close()
    finally:
        server.stop()
