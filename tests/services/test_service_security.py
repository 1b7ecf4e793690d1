"""Bearer tokens, tenants and TLS through a real server: a tenant never sees another's chunks through
any call, a wrong or missing token is UNAUTHENTICATED, plaintext cannot reach a TLS server."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request

import grpc
import pytest
from tests.helpers.service import DOCUMENTS, ServerProcess, status_of

from services.bench.launch import free_port

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-fedcba9876543210"


def _self_signed(folder):
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not on PATH (needed to make the TLS test certificate)")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def server(service_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("secure-server")
    cert, key = _self_signed(folder)
    metrics_port, http_port = free_port(), free_port()
    server = ServerProcess(folder, service_model_dir, {
        "server": {"chunk_tokens": 128, "default_max_new_tokens": 2, "metrics_port": metrics_port,
                   "metrics_tls": True},
        "store": {"cpu_bytes": 64 << 20},
        "auth": {"tokens": {ALICE: "alice", BOB: "bob"}},
        "tls": {"cert": str(cert), "key": str(key)},
    }, flags=("--http-port", str(http_port)))
    server.http_port = http_port
    server.cert = cert
    server.metrics_port = metrics_port
    yield server
    assert server.stop() == 0, server.stderr()[-3000:]


@pytest.fixture(scope="module")
def alice(server):
    with server.client(token=ALICE, tls_ca=server.cert) as client:
        client.wait_ready(30)
        yield client


@pytest.fixture(scope="module")
def bob(server):
    with server.client(token=BOB, tls_ca=server.cert) as client:
        yield client


@pytest.fixture(scope="module")
def alice_ids(alice):
    return [d.chunk_ids[0] for d in alice.ingest(DOCUMENTS).documents]


def test_wrong_or_missing_token_is_unauthenticated_on_every_call(server, alice_ids):
    for token in ("not-a-token-at-all-000", None):
        with server.client(token=token, tls_ca=server.cert) as stranger:
            calls = [lambda: stranger.ingest([{"text": "x"}]), lambda: stranger.retrieve("capital"),
                     lambda: stranger.generate("q", chunk_ids=alice_ids[:1]),
                     lambda: stranger.delete(alice_ids[:1]), lambda: stranger.stats()]
            for call in calls:
                code, details = status_of(call)
                assert code == grpc.StatusCode.UNAUTHENTICATED, details
                assert "token" in details and ALICE not in details
            assert stranger.health("") == "SERVING"  # health needs no token: probes carry none


def test_a_token_cannot_claim_another_tenant(server):
    with server.client(token=ALICE, tenant="bob", tls_ca=server.cert) as client:
        code, details = status_of(lambda: client.retrieve("capital"))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "'bob'" in details


def test_another_tenants_chunks_are_not_found_through_any_call(alice, bob, alice_ids):
    assert bob.retrieve("capital of France", k=10).chunks == []
    assert bob.stats().tenant_chunks == 0
    for cid in alice_ids:
        code, details = status_of(lambda cid=cid: bob.generate("q", chunk_ids=[cid]))
        assert code == grpc.StatusCode.NOT_FOUND and cid in details
        code, _ = status_of(lambda cid=cid: bob.delete([cid]))
        assert code == grpc.StatusCode.NOT_FOUND
    answer = bob.answer("What is the capital of France?", top_k=3)
    assert list(answer.report.chunk_ids) == []  # bob's retrieval sees an empty collection
    assert alice.stats().tenant_chunks == len(DOCUMENTS)
    assert [c.chunk_id for c in alice.retrieve("capital of France", k=1).chunks] == alice_ids[:1]


def test_the_same_text_in_two_tenants_is_two_chunks_with_separate_kv(alice, bob, alice_ids):
    mine = bob.ingest(DOCUMENTS[:1])
    assert mine.chunks_added == 1 and mine.kv_computed == 1  # alice's KV is not shared with bob
    bob_id = mine.documents[0].chunk_ids[0]
    assert bob_id == alice_ids[0]  # same text, same content address, in bob's own collection
    bob.delete([bob_id])
    report = alice.answer("Where?", chunk_ids=alice_ids[:1], mode="reuse").report
    assert report.chunks_missing == 0 and sum(report.chunks_hit.values()) == 1  # alice's KV survived


def test_plaintext_cannot_reach_the_tls_server(server):
    with server.client() as plain:
        code, _ = status_of(lambda: plain.stats(timeout=5))
    assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_metrics_tls_serves_metrics_over_https_with_the_servers_certificate(server, alice_ids):
    url = f"https://127.0.0.1:{server.metrics_port}/metrics"
    trusted = ssl.create_default_context(cafile=str(server.cert))
    text = urllib.request.urlopen(url, timeout=5, context=trusted).read().decode()
    assert 'kvblend_rpcs_total{code="OK",method="IngestChunks"}' in text
    with pytest.raises(OSError):  # plain HTTP gets no metrics (the TLS handshake fails)
        urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5)


def test_with_tls_the_openai_http_api_is_https_with_the_servers_certificate(server):
    trusted = ssl.create_default_context(cafile=str(server.cert))
    request = urllib.request.Request(f"https://127.0.0.1:{server.http_port}/v1/models",
                                     headers={"Authorization": f"Bearer {ALICE}"})
    with urllib.request.urlopen(request, context=trusted, timeout=10) as response:
        assert response.status == 200 and json.load(response)["object"] == "list"
    with pytest.raises(urllib.error.HTTPError) as refused:  # the same tokens: a wrong one is 401
        urllib.request.urlopen(urllib.request.Request(request.full_url, headers={"Authorization": "Bearer nope"}),
                               context=trusted, timeout=10)
    assert refused.value.code == 401 and json.load(refused.value)["error"]["type"] == "authentication_error"
    with pytest.raises(OSError):  # plain HTTP reaches nothing (the TLS handshake fails)
        urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/v1/models", timeout=5)
