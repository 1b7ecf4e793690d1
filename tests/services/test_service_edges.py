"""Smaller edges found by trying to break a running server (issue 19, item 9), through a real `kvblend serve`
of the tiny model with auth on, gRPC on every interface and metrics served: unreadable requests,
deadlines in the metrics, where the metrics listen."""

from __future__ import annotations

import re
import threading
import time
import urllib.request

import grpc
import pytest
from tests.helpers.service import DOCUMENTS, ServerProcess

from services.bench.launch import free_port
from services.client import Answer

TOKEN = "edge-token-0123456789abcdef"


@pytest.fixture(scope="module")
def server(service_model_dir, tmp_path_factory):
    metrics_port = free_port()
    server = ServerProcess(tmp_path_factory.mktemp("edges-server"), service_model_dir, {
        "server": {"host": "0.0.0.0", "chunk_tokens": 128, "max_new_tokens": 2000, "metrics_port": metrics_port},
        "store": {"disk_path": ""},
        "auth": {"tokens": {TOKEN: "edges"}},
    })
    server.metrics_port = metrics_port
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    with server.client(token=TOKEN) as client:
        client.wait_ready(30)
        yield client


def _rpc_count(server, method: str, code: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    found = re.search(rf'^kvblend_rpcs_total{{code="{code}",method="{method}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


@pytest.mark.parametrize(("method", "data"), [
    ("Retrieve", b"\x0a\x02\xc3\x28"),  # query (field 1) holding bytes that are not UTF-8
    ("IngestChunks", b"\xff\xff\xff\xff\xff"),  # not a protobuf message at all
    ("Generate", b"\x0a\x03\xed\xa0\x80"),  # query: a UTF-16 surrogate encoded as UTF-8, invalid
])
def test_an_unreadable_request_from_a_peer_without_a_token_is_invalid_argument_and_logs_no_traceback(
        server, client, method, data):
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as refused:
        path = f"/kvblend.v1.ChunkCache/{method}"  # sent as they are: no token, no serializer
        if method == "Generate":
            list(channel.unary_stream(path)(data, timeout=10))
        else:
            channel.unary_unary(path)(data, timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    assert "not a valid kvblend.v1." in refused.value.details()
    assert "Traceback" not in server.stderr()
    assert client.retrieve("Paris", timeout=10) is not None  # the server goes on


def _generate_counted(server, client, seed: str, timeout: float, cancel_after: float | None) -> dict[str, float]:
    """One long Generate with a `timeout` deadline, cancelled by the client after `cancel_after` s; how
    the server's /metrics counted it (the change in kvblend_rpcs_total by code)."""
    codes = ("DEADLINE_EXCEEDED", "CANCELLED", "OK")
    before = {code: _rpc_count(server, "Generate", code) for code in codes}
    stream = client.generate("Tell me a long story.", chunk_ids=[seed], mode="reuse", max_new_tokens=900,
                             timeout=timeout)
    if cancel_after is not None:
        threading.Timer(cancel_after, stream.cancel).start()
    with pytest.raises(grpc.RpcError):
        Answer.collect(stream)
    waited = time.monotonic() + 5  # the server counts a call when it sees it end, just after the client
    while sum(_rpc_count(server, "Generate", code) for code in codes) == sum(before.values()):
        assert time.monotonic() < waited, "the call was never counted"
        time.sleep(0.05)
    return {code: _rpc_count(server, "Generate", code) - before[code] for code in codes}


def test_a_stream_ended_by_its_deadline_is_counted_as_deadline_exceeded_a_real_cancel_as_cancelled(
        server, client):
    """/metrics counts a Generate stream whose deadline passed as DEADLINE_EXCEEDED, also when the client
    gave up 30 ms before the server's deadline (a remote client's deadline fires one network latency before
    the server's, and it reaches the server as a cancel); a cancel well before the deadline is CANCELLED."""
    seed = client.ingest(DOCUMENTS[:1], timeout=60).documents[0].chunk_ids[0]
    assert _generate_counted(server, client, seed, 0.5, None) == {"DEADLINE_EXCEEDED": 1, "CANCELLED": 0, "OK": 0}
    # (0.7 s: the stream must still run when the client gives up; the tiny model's 900 tokens, its context's worth,
    # took under a second on a quiet run of the whole suite, and the stream ended OK before a 0.97 s cancel.)
    assert _generate_counted(server, client, seed, 0.7, 0.67) == {"DEADLINE_EXCEEDED": 1, "CANCELLED": 0, "OK": 0}
    assert _generate_counted(server, client, seed, 5.0, 0.3) == {"DEADLINE_EXCEEDED": 0, "CANCELLED": 1, "OK": 0}


def _listening(port: int) -> set[str]:
    """The local addresses (hex, as /proc/net/tcp{,6} write them) of sockets listening on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def test_metrics_listen_on_loopback_while_grpc_listens_on_every_interface(server):
    assert _listening(server.port) & {"00000000", "00000000000000000000000000000000"}  # 0.0.0.0 or ::
    assert _listening(server.metrics_port) == {"0100007F"}  # 127.0.0.1 only
