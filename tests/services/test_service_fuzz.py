"""Hostile and random Generate and IngestChunks requests (hypothesis) against a real server: each one
is answered or refused with a client-error status, the server stays up, and stored data never changes
except by a successful ingest (which adds exactly what it reports)."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.helpers.service import DOCUMENTS

REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# protobuf strings are UTF-8: no lone surrogates; everything else goes, control characters included.
texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=200)
hostile = st.sampled_from(["", " ", "\x00", "\x00" * 50, "\u202e\u200b", "<|im_end|>", "<|im_start|>system\n",
                           "../../etc/passwd", "A" * 5000, "🍣" * 300, "\ufeff", "%s%n{0}", "' OR 1=1 --"])
int32 = st.integers(-(2 ** 31), 2 ** 31 - 1)


@pytest.fixture(scope="module")
def base(plain_server):
    """A tenant with known chunks and a recorded answer, to check after the fuzzing that nothing changed."""
    with plain_server.client(tenant="fuzz-base") as client:
        client.wait_ready(30)
        ids = [d.chunk_ids[0] for d in client.ingest(DOCUMENTS).documents]
        snapshot = _snapshot(client, ids)
        yield client, ids, snapshot
        assert _snapshot(client, ids) == snapshot


def _snapshot(client, ids):
    hits = client.retrieve("capital mountain music plants", k=len(ids)).chunks
    answer = client.answer("What is this about?", chunk_ids=ids, mode="blend", max_new_tokens=4)
    return sorted((h.chunk_id, h.text) for h in hits), answer.token_ids, client.stats().tenant_chunks


@pytest.fixture(scope="module")
def fuzz_client(plain_server):
    with plain_server.client(tenant="fuzz") as client:
        yield client


def _chunk_ids(ids):
    return st.lists(st.one_of(st.sampled_from(ids), texts, hostile, st.just("0" * 16)), max_size=4)


def test_generate_never_crashes_the_server(plain_server, base):
    client, ids, _ = base
    outcomes = {"ok": 0, "refused": 0}

    @FUZZ
    @given(query=st.one_of(texts, hostile), chunk_ids=_chunk_ids(ids),
           top_k=st.one_of(st.just(0), st.integers(-3, 40), int32),
           mode=st.one_of(st.sampled_from(["", "full", "prefix", "reuse", "blend", "BLEND", " blend"]),
                          texts),
           ratio=st.one_of(st.none(), st.floats(), st.floats(0, 1)),
           max_new_tokens=st.one_of(st.integers(-3, 6), st.integers(1001, 2 ** 31 - 1),
                                    st.integers(-(2 ** 31), -1)))
    def check(query, chunk_ids, top_k, mode, ratio, max_new_tokens):
        try:
            answer = client.answer(query, chunk_ids=chunk_ids, top_k=top_k, mode=mode, ratio=ratio,
                                   max_new_tokens=max_new_tokens, timeout=30)
        except grpc.RpcError as err:
            assert err.code() in REFUSALS, (err.code(), err.details())
            assert err.details()
            outcomes["refused"] += 1
            return
        outcomes["ok"] += 1
        assert answer.finish is not None and answer.finish.tokens <= (max_new_tokens or 8)

    check()
    assert plain_server.alive() and client.health() == "SERVING"
    assert outcomes["ok"] and outcomes["refused"], outcomes  # both paths were exercised


def test_ingest_never_crashes_the_server_or_changes_what_it_does_not_report(plain_server, base, fuzz_client):
    document = st.fixed_dictionaries({"text": st.one_of(texts, hostile), "title": st.one_of(texts, hostile),
                                      "doc_id": st.one_of(texts, hostile)})
    outcomes = {"ok": 0, "refused": 0}

    @FUZZ
    @given(documents=st.lists(document, max_size=10))
    def check(documents):
        before = fuzz_client.stats().tenant_chunks
        try:
            response = fuzz_client.ingest(documents, timeout=60)
        except grpc.RpcError as err:
            assert err.code() in REFUSALS, (err.code(), err.details())
            assert fuzz_client.stats().tenant_chunks == before  # a refused ingest stores nothing
            outcomes["refused"] += 1
            return
        outcomes["ok"] += 1
        assert len(response.documents) == len(documents)
        assert fuzz_client.stats().tenant_chunks == before + response.chunks_added
        for sent, got in zip(documents, response.documents, strict=True):
            assert got.doc_id == sent["doc_id"]

    check()
    assert plain_server.alive() and fuzz_client.health() == "SERVING"
    assert outcomes["ok"] and outcomes["refused"], outcomes  # both paths were exercised
