"""Operations through a real server: Redis down, a full queue, the quality guard, draining on SIGTERM."""

from __future__ import annotations

import signal
import socket
import threading
import time

import grpc
import pytest
from tests.helpers.service import DOCUMENTS, ServerProcess, status_of

from services.client import Answer, Client


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens here once the socket is closed


@pytest.fixture(scope="module")
def server(service_model_dir, tmp_path_factory):
    """Redis is the only KV tier and it is down; one request generates at a time and one may wait; every
    blend request is checked against full prefill and answered from it (max_kl 0)."""
    server = ServerProcess(tmp_path_factory.mktemp("ops-server"), service_model_dir, {
        "server": {"chunk_tokens": 128, "max_waiting": 1, "max_active": 1, "health_interval_s": 0.2},
        "store": {"cpu_bytes": 0, "disk_path": "", "redis_url": f"redis://127.0.0.1:{_closed_port()}/0",
                  "redis_timeout_s": 0.2},
        "guard": {"fraction": 1.0, "max_kl": 0.0},
    })
    yield server
    assert server.stop() == 0, server.stderr()[-3000:]


@pytest.fixture(scope="module")
def ingested(client):
    return client.ingest(DOCUMENTS)


def test_with_redis_down_ingest_and_generate_succeed_and_report_the_degraded_tier(client, ingested):
    ids = [d.chunk_ids[0] for d in ingested.documents]
    assert ingested.chunks_added == len(DOCUMENTS) and ingested.kv_not_stored == len(DOCUMENTS)
    answer = client.answer("Where is Everest?", chunk_ids=ids, mode="reuse", max_new_tokens=3)
    assert answer.finish.tokens == 3
    assert answer.report.chunks_missing == len(ids) and dict(answer.report.chunks_hit) == {}
    assert list(answer.report.degraded_tiers) == ["redis"]
    stats = client.stats()
    assert list(stats.degraded_tiers) == ["redis"]
    assert [(t.name, t.available) for t in stats.tiers] == [("redis", False)]
    assert stats.tiers[0].skipped_writes >= len(DOCUMENTS)
    assert client.health("kvblend.v1.ChunkCache/tier/redis") == "NOT_SERVING"
    assert client.health("") == "SERVING"  # slower, still answering: not a readiness failure


def test_the_quality_guard_answers_from_full_prefill_above_its_kl_limit(client, ingested):
    ids = [d.chunk_ids[0] for d in ingested.documents]
    full = client.answer("What is photosynthesis?", chunk_ids=ids, mode="full", max_new_tokens=6)
    blend = client.answer("What is photosynthesis?", chunk_ids=ids, mode="blend", ratio=0.0, max_new_tokens=6)
    quality = blend.report.quality
    assert quality.checked and quality.kl > 0.0 and quality.fell_back
    assert blend.token_ids == full.token_ids
    assert not full.report.quality.checked  # only blend requests are checked
    guard = client.stats().guard
    assert guard.checked >= 1 and guard.fell_back == guard.checked and guard.mean_kl > 0


def test_a_full_queue_is_resource_exhausted_and_the_rest_succeed(server, client, ingested):
    ids = [d.chunk_ids[0] for d in ingested.documents]
    outcomes: list[object] = []
    lock = threading.Lock()
    start = threading.Barrier(10)

    def one():
        with server.client() as own:
            start.wait()
            try:
                result = own.answer("Keep talking.", chunk_ids=ids, mode="full", max_new_tokens=150)
            except grpc.RpcError as err:
                result = (err.code(), err.details())
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=one) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    answered = [o for o in outcomes if isinstance(o, Answer)]
    refused = [o for o in outcomes if not isinstance(o, Answer)]
    assert len(outcomes) == 10 and answered and refused
    for code, details in refused:
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in details
    assert all(a.finish.tokens == 150 for a in answered)
    assert client.stats().rejected == len(refused)


@pytest.fixture(scope="module")
def offline_server(service_model_dir, tmp_path_factory):
    """A server over a data folder that `kvblend ingest` filled before it started."""
    from services.commands.cli import main as ingest_main

    folder = tmp_path_factory.mktemp("offline-server")
    docs = folder / "docs"
    docs.mkdir()
    for document in DOCUMENTS[:2]:
        (docs / f"{document['doc_id']}.md").write_text(f"# {document['title']}\n{document['text']}\n")
    assert ingest_main(["ingest", "--docs", str(docs), "--data-dir", str(folder / "data"), "--model",
                        str(service_model_dir), "--chunk-tokens", "128", "-q"]) == 0
    server = ServerProcess(folder, service_model_dir, {"server": {"chunk_tokens": 128, "drain_s": 30}})
    yield server
    server.stop()


def test_chunks_ingested_offline_are_served_from_the_disk_tier(offline_server):
    with offline_server.client() as client:
        answer = client.answer("Where does the Seine flow?", top_k=2, mode="reuse", max_new_tokens=1)
    assert len(answer.report.chunk_ids) == 2
    assert dict(answer.report.chunks_hit) == {"disk": 2} and answer.report.chunks_missing == 0


def test_sigterm_drains_in_flight_requests_then_exits(offline_server):
    server = offline_server
    with server.client() as client:
        ids = [h.chunk_id for h in client.retrieve("Paris", k=2).chunks]
        stream = client.generate("Talk.", chunk_ids=ids, mode="blend", max_new_tokens=700)
        first = next(stream)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with Client(server.target) as late:
            code, _ = status_of(lambda: late.stats(timeout=5))
        assert code == grpc.StatusCode.UNAVAILABLE  # no new calls once draining
        rest = Answer.collect(stream)
    assert first.HasField("report") and rest.finish.reason in ("length", "context")
    assert rest.finish.tokens == 1 + len(rest.token_ids) > 100
    assert server.process.wait(60) == 0
    assert any("stopped" in line for line in server.output(timeout=1.0))
