"""End to end through a real `kvblend serve` process: ingest -> retrieve -> generate in every mode,
every error status, cancellation, deadlines and responsiveness while a request generates."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from tests.helpers.service import CONTEXT, DOCUMENTS, redis_prefix_keys, status_of

from services.client import Answer

MODES = ("full", "prefix", "reuse", "blend")


@pytest.fixture(scope="module")
def client(plain_server):
    with plain_server.client(tenant="e2e") as client:
        client.wait_ready(30)
        yield client


@pytest.fixture(scope="module")
def chunk_ids(client):
    response = client.ingest(DOCUMENTS)
    assert [d.doc_id for d in response.documents] == [d["doc_id"] for d in DOCUMENTS]
    return [d.chunk_ids[0] for d in response.documents]


def test_health_and_reflection_answer(plain_server, client):
    assert client.health("") == "SERVING"
    assert client.health("kvblend.v1.ChunkCache") == "SERVING"
    assert client.health("kvblend.v1.ChunkCache/tier/redis") == "SERVING"
    services = ProtoReflectionDescriptorDatabase(client.channel).get_services()
    assert {"kvblend.v1.ChunkCache", "grpc.health.v1.Health"} <= set(services)


def test_ingest_gives_content_ids_and_is_idempotent(client, chunk_ids):
    assert len(set(chunk_ids)) == len(DOCUMENTS)
    assert all(len(cid) == 16 for cid in chunk_ids)
    again = client.ingest(DOCUMENTS[:2])
    assert [d.chunk_ids[0] for d in again.documents] == chunk_ids[:2]
    assert (again.chunks_added, again.chunks_existing, again.kv_computed) == (0, 2, 0)


def test_retrieve_ranks_the_matching_passage_first(client, chunk_ids):
    hits = client.retrieve("Which river flows through the French capital?", k=3).chunks
    assert len(hits) == 3
    assert hits[0].chunk_id == chunk_ids[0] and hits[0].title == "Paris" and hits[0].doc_id == "paris"
    assert hits[0].score > hits[1].score >= hits[2].score
    assert "Seine" in hits[0].text and hits[0].tokens > 0


@pytest.mark.parametrize("mode", MODES)
def test_generate_streams_tokens_with_ttft_and_report_in_every_mode(client, chunk_ids, mode):
    ids = chunk_ids[1:4]
    messages = list(client.generate("Where is Mount Everest?", chunk_ids=ids, mode=mode, ratio=0.5,
                                    max_new_tokens=6))
    first, last = messages[0], messages[-1]
    assert first.ttft_s > 0 and first.HasField("report")
    assert not any(m.HasField("report") for m in messages[1:])
    report = first.report
    assert report.mode == mode and list(report.chunk_ids) == ids
    assert report.prompt_tokens > report.chunk_tokens > 0
    tokens = [t for m in messages for t in m.token_ids]
    assert last.finish.reason == "length" and last.finish.tokens == len(tokens) == 6
    assert len(messages) >= 6  # one message per token, streamed
    hits = sum(report.chunks_hit.values()) + report.chunks_missing
    assert hits == {"full": 0, "prefix": 1, "reuse": 3, "blend": 3}[mode]
    if mode == "blend":
        assert 0 < report.tokens_recomputed < report.chunk_tokens
        assert report.ratio == 0.5
    else:
        assert report.tokens_recomputed == 0


def test_an_ingested_chunk_with_room_in_the_cpu_tier_is_read_from_it_at_once_and_kept_in_redis(plain_server, client):
    """Admission (on second use) decides what the CPU tier evicts, not what fills its free room: a chunk that fits is
    copied there on ingest and read from it from its first use, and Redis, where admission puts it, keeps it too
    (across restarts; other replicas)."""
    kyoto = {"text": "Kyoto was the capital of Japan for a thousand years.", "title": "Kyoto"}
    before = len(redis_prefix_keys(plain_server.redis_prefix))
    ids = [d.chunk_ids[0] for d in client.ingest([kyoto]).documents]
    assert len(redis_prefix_keys(plain_server.redis_prefix)) > before  # its manifest and layers, in Redis
    first = client.answer("Which city?", chunk_ids=ids, mode="reuse", max_new_tokens=1).report
    assert dict(first.chunks_hit) == {"cpu": 1} and first.chunks_missing == 0


def test_blend_at_ratio_one_answers_as_full_prefill(client, chunk_ids):
    full = client.answer("What grows in New Orleans?", chunk_ids=chunk_ids, mode="full", max_new_tokens=8)
    blend = client.answer("What grows in New Orleans?", chunk_ids=chunk_ids, mode="blend", ratio=1.0,
                          max_new_tokens=8)
    assert blend.token_ids == full.token_ids and blend.text == full.text
    assert blend.report.tokens_recomputed == blend.report.chunk_tokens


def test_top_k_generation_uses_the_retrieved_chunks_in_rank_order(client, chunk_ids):
    retrieved = client.retrieve("jazz music in New Orleans", k=2).chunks
    answer = client.answer("jazz music in New Orleans", top_k=2, mode="blend", max_new_tokens=2)
    assert list(answer.report.chunk_ids) == [c.chunk_id for c in retrieved]
    assert list(answer.report.scores) == pytest.approx([c.score for c in retrieved], abs=1e-5)
    assert answer.report.retrieve_s > 0


def test_errors_name_the_bad_value(client, chunk_ids):
    code, details = status_of(lambda: client.generate("q", chunk_ids=[chunk_ids[0], "0123456789abcdef"]))
    assert code == grpc.StatusCode.NOT_FOUND and "'0123456789abcdef'" in details
    code, details = status_of(lambda: client.generate("   ", chunk_ids=chunk_ids[:1]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "empty query" in details
    code, details = status_of(lambda: client.generate("q", chunk_ids=chunk_ids[:1], ratio=1.5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "1.5" in details and "[0, 1]" in details
    code, details = status_of(lambda: client.generate("q", chunk_ids=chunk_ids[:1], mode="turbo"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'turbo'" in details and "blend" in details
    code, details = status_of(lambda: client.generate("q", chunk_ids=chunk_ids[:1], top_k=2))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not both" in details
    code, details = status_of(lambda: client.generate("q", chunk_ids=chunk_ids[:1], max_new_tokens=5000))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "5000" in details
    code, details = status_of(lambda: client.retrieve(""))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "empty query" in details
    code, details = status_of(lambda: client.delete(["feedfacefeedface"]))
    assert code == grpc.StatusCode.NOT_FOUND and "'feedfacefeedface'" in details
    code, details = status_of(lambda: client.ingest([{"text": "fine"}, {"text": " \n", "doc_id": "blank"}]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "document 1" in details and "'blank'" in details


def test_a_prompt_over_the_context_is_invalid_with_its_token_counts(client):
    long_text = " ".join(f"Sentence number {i} says nothing much about anything at all." for i in range(150))
    documents = client.ingest([{"text": long_text, "title": "Long"}]).documents
    ids = [cid for d in documents for cid in d.chunk_ids]
    assert len(ids) > CONTEXT // 128
    code, details = status_of(lambda: client.generate("Summarise.", chunk_ids=ids, mode="full"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"context of {CONTEXT} tokens" in details and f"{len(ids)} chunks" in details


def test_delete_removes_text_vector_and_kv(plain_server, client):
    doc = {"text": "The okapi is a giraffid native to the Congo rainforest.", "title": "Okapi"}
    cid = client.ingest([doc]).documents[0].chunk_ids[0]
    before = len(redis_prefix_keys(plain_server.redis_prefix))
    assert client.retrieve("okapi giraffid", k=1).chunks[0].chunk_id == cid
    response = client.delete([cid])
    assert list(response.deleted) == [cid] and response.kv_entries_deleted == 1
    assert len(redis_prefix_keys(plain_server.redis_prefix)) < before
    assert cid not in [c.chunk_id for c in client.retrieve("okapi giraffid", k=5).chunks]
    code, details = status_of(lambda: client.generate("okapi?", chunk_ids=[cid]))
    assert code == grpc.StatusCode.NOT_FOUND and cid in details


def _wait_idle(client, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = client.stats()
        if stats.active == 0 and stats.queue_depth == 0:
            return stats
        time.sleep(0.05)
    raise AssertionError("the model worker is still busy")


def test_a_cancelled_stream_stops_generating(client, chunk_ids):
    before = _wait_idle(client)
    stream = client.generate("Tell me everything.", chunk_ids=chunk_ids, mode="blend", max_new_tokens=900)
    received = [next(stream) for _ in range(3)]
    assert received[0].HasField("report")
    stream.cancel()
    after = _wait_idle(client)
    assert after.cancelled == before.cancelled + 1
    assert after.tokens_generated - before.tokens_generated < 300  # of the 900 asked for


def test_a_deadline_stops_generating(client, chunk_ids):
    before = _wait_idle(client)
    code, _ = status_of(lambda: client.generate("Go on.", chunk_ids=chunk_ids, max_new_tokens=900,
                                                timeout=0.3))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    after = _wait_idle(client)
    assert after.cancelled == before.cancelled + 1
    assert after.tokens_generated - before.tokens_generated < 900


def test_other_rpcs_answer_while_a_long_generation_runs(client, chunk_ids):
    stream = client.generate("Go on and on.", chunk_ids=chunk_ids, mode="full", max_new_tokens=900)
    next(stream)
    done = threading.Event()
    collected = []
    def read_rest():
        collected.append(Answer.collect(stream))
        done.set()

    threading.Thread(target=read_rest, daemon=True).start()
    latencies = []
    for _ in range(5):
        started = time.perf_counter()
        client.retrieve("capital of France", k=2)
        client.stats()
        latencies.append(time.perf_counter() - started)
    assert not done.is_set(), "the generation ended before the other calls could be measured against it"
    assert max(latencies) < 0.5, latencies
    # A short generation queued behind the long one is interleaved, not made to wait for it.
    short = client.answer("Short?", chunk_ids=chunk_ids[:1], mode="full", max_new_tokens=2)
    assert short.finish.tokens == 2
    assert not done.is_set(), "the short request waited for the long one to finish"
    assert done.wait(60) and collected[0].finish.reason in ("length", "context")
