"""Ingest cannot starve the server, a cancelled ingest stops, tenants' open collections are bounded and a
deleted chunk store is refused and reported (issue 19, items 1, 3, 6 and 7), through real `kvblend serve`
processes of the tiny model, CPU tier only."""

from __future__ import annotations

import os
import threading
import time

import grpc
import pytest
from tests.helpers.service import DOCUMENTS, ServerProcess

from proto import kvblend_pb2 as pb
from retriever.collection import DOCSTORE_FILE
from services.bench.hardening import Probe
from services.client import Answer
from services.serving.catalog import TENANTS_DIR
from services.serving.server import CATALOG_HEALTH, SERVICE

MAX_INGEST_CALLS = 2
TINY_INGESTS = 60


@pytest.fixture(scope="module")
def server(service_model_dir, tmp_path_factory):
    server = ServerProcess(tmp_path_factory.mktemp("hardening-server"), service_model_dir, {
        "server": {"chunk_tokens": 128, "max_waiting": 4, "max_active": 2, "max_ingest_calls": MAX_INGEST_CALLS,
                   "rpc_threads": 24, "max_new_tokens": 1000, "max_documents": 8, "max_document_chars": 200000},
        "store": {"disk_path": ""},
    })
    yield server
    code = server.stop()
    assert code == 0, server.stderr()[-3000:]


@pytest.fixture(scope="module")
def client(server):
    with server.client(tenant="hardening") as client:
        client.wait_ready(30)
        yield client


def test_ingests_past_the_cap_are_refused_at_once_while_health_stats_and_generate_answer(client):
    """60 tiny ingests sent at once, while a 1000-token answer streams: those past the 2 ingest places are
    RESOURCE_EXHAUSTED within 1 s, naming the limit; the rest succeed; Health.Check and Stats answer
    within 1 s throughout; a Generate sent meanwhile completes."""
    seed = client.ingest(DOCUMENTS[:1], timeout=60).documents[0].chunk_ids[0]
    long = client.generate("Tell me a very long story.", chunk_ids=[seed], mode="full", max_new_tokens=1000,
                           timeout=300)
    long_answer: list[Answer] = []
    reader = threading.Thread(target=lambda: long_answer.append(Answer.collect(long)))
    reader.start()
    ended: dict[int, tuple[float, grpc.StatusCode, str]] = {}

    def on_done(index: int, sent: float):
        def record(future) -> None:
            error = future.exception()
            code, details = (grpc.StatusCode.OK, "") if error is None else (error.code(), error.details())
            ended[index] = (time.monotonic() - sent, code, details)
        return record

    with Probe(client, names=("health", "stats")) as probe:
        time.sleep(0.3)  # the long answer is decoding
        futures = []
        for i in range(TINY_INGESTS):
            request = pb.IngestRequest(documents=[pb.Document(
                text=f"Tiny fact number {i}: the lighthouse on island {i} has {i + 3} lamps.", title=f"fact {i}",
                doc_id=f"fact-{i}")])
            future = client.stub.IngestChunks.future(request, timeout=120, metadata=client.metadata)
            future.add_done_callback(on_done(i, time.monotonic()))
            futures.append(future)
        short = client.answer("How many lamps?", chunk_ids=[seed], mode="reuse", max_new_tokens=4, timeout=120)
        for future in futures:
            future.exception(timeout=120)  # every call has ended
        reader.join(300)
    assert probe.calls >= 6 and not probe.failures, probe.failures  # three rounds at least
    assert probe.slowest["health"] < 1.0 and probe.slowest["stats"] < 1.0, probe.slowest
    refused = [(seconds, details) for seconds, code, details in ended.values()
               if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    others = {code for _, code, _ in ended.values() if code != grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert len(ended) == TINY_INGESTS and others <= {grpc.StatusCode.OK}, others
    assert len(refused) >= TINY_INGESTS // 2, f"only {len(refused)} of {TINY_INGESTS} refused"
    assert all("max_ingest_calls" in details or "max_waiting" in details for _, details in refused), refused[:3]
    assert max(seconds for seconds, _ in refused) < 1.0, "a refused ingest waited"
    assert short.finish is not None and short.finish.tokens >= 1
    assert long_answer and long_answer[0].finish is not None


def _kv_bytes(stats: pb.StatsResponse) -> int:
    return sum(tier.bytes for tier in stats.tiers)


def test_a_cancelled_ingest_stops_between_chunks_records_nothing_and_its_kv_is_reused(server):
    """A ~340-chunk document, cancelled by the client as soon as its first KV is stored: the stored KV stops
    growing, no chunk is recorded, and ingesting it again computes only the chunks not stored before."""
    text = " ".join(f"Entry {i} of the ledger records {i * 7} crates of tea from port {i % 13}." for i in range(1800))
    request = pb.IngestRequest(documents=[pb.Document(text=text, title="ledger", doc_id="ledger")])
    with server.client(tenant="cancelled") as client:
        client.wait_ready(30)
        before = _kv_bytes(client.stats(timeout=5))
        call = client.stub.IngestChunks.future(request, metadata=client.metadata)
        waited = time.monotonic() + 120
        while _kv_bytes(client.stats(timeout=5)) == before and time.monotonic() < waited:
            time.sleep(0.05)
        assert call.cancel(), "the ingest ended before it could be cancelled"
        time.sleep(0.5)  # the chunk being computed when the call ended may still be stored
        samples = []
        for _ in range(4):
            stats = client.stats(timeout=5)
            samples.append((_kv_bytes(stats), stats.tenant_chunks))
            time.sleep(0.5)
        assert len({kv for kv, _ in samples}) == 1, f"KV bytes still growing after the cancel: {samples}"
        assert {chunks for _, chunks in samples} == {0}, "a cancelled ingest recorded chunks"
        assert samples[0][0] > before

        again = client.ingest([{"text": text, "title": "ledger", "doc_id": "ledger"}], timeout=300)
        total = again.chunks_added
        stored_before = total - again.kv_computed
        assert total > 300 and client.stats(timeout=5).tenant_chunks == total
        assert 0 < stored_before < total // 4, f"{stored_before} of {total} chunks' KV stored before the cancel"


@pytest.fixture(scope="module")
def few_tenants_server(service_model_dir, tmp_path_factory):
    """Two open tenant collections at most, health checked every 0.2 s."""
    server = ServerProcess(tmp_path_factory.mktemp("few-tenants-server"), service_model_dir, {
        "server": {"chunk_tokens": 128, "max_open_tenants": 2, "health_interval_s": 0.2},
        "store": {"disk_path": ""},
    })
    yield server
    server.stop()


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_the_servers_descriptors_do_not_grow_with_the_number_of_tenants(few_tenants_server):
    """`server.max_open_tenants = 2` reaches the catalog: 3 tenants' ingests, then 12 more, leave the
    server with no more open file descriptors than after the first 3; the first tenant's chunks are still
    found after being closed."""
    server = few_tenants_server
    request = pb.IngestRequest(documents=[pb.Document(**DOCUMENTS[0])])
    with server.client() as client:  # one connection: the tenant is each call's header
        client.wait_ready(30)
        ingested = {}
        for i in range(15):
            if i == 3:
                before = _open_fds(server.process.pid)
            ingested[i] = client.stub.IngestChunks(request, timeout=60, metadata=[("kvblend-tenant", f"fd{i}")])
        assert _open_fds(server.process.pid) <= before
        hits = client.stub.Retrieve(pb.RetrieveRequest(query="Paris", k=1), timeout=10,
                                    metadata=[("kvblend-tenant", "fd0")])
        assert [hit.chunk_id for hit in hits.chunks] == list(ingested[0].documents[0].chunk_ids)


def test_a_deleted_chunk_store_refuses_ingest_and_turns_health_not_serving(few_tenants_server):
    """With a tenant's chunks.sqlite deleted while served: its next ingest is UNAVAILABLE (no path in the
    message), the server logs an error naming the file, and health turns NOT_SERVING."""
    server = few_tenants_server
    with server.client(tenant="doomed") as client:
        client.wait_ready(30)
        client.ingest(DOCUMENTS[:1], timeout=60)
        store = server.folder / "data" / TENANTS_DIR / "doomed" / DOCSTORE_FILE
        for suffix in ("", "-wal", "-shm"):
            store.with_name(store.name + suffix).unlink(missing_ok=True)
        with pytest.raises(grpc.RpcError) as refused:
            client.ingest(DOCUMENTS[1:2], timeout=60)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
        assert str(server.folder) not in refused.value.details()
        waited = time.monotonic() + 10
        while client.health(SERVICE, timeout=1.0) == "SERVING" and time.monotonic() < waited:
            time.sleep(0.05)
        assert client.health(SERVICE, timeout=1.0) == "NOT_SERVING"
        assert client.health(CATALOG_HEALTH, timeout=1.0) == "NOT_SERVING"
    assert f"chunk store {store} was deleted" in server.stderr()
