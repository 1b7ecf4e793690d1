"""A small client for the kvblend service (services/commands/query.py is `kvblend query` over it).

    client = Client("127.0.0.1:50051", token=..., tls_ca=...)
    client = Client("10.0.0.5:50051,10.0.0.6:50051")   # round robin over replicas
    client = Client("dns:///kvblend-headless:50051")   # round robin over every address the name has
    ids = client.ingest([{"text": ..., "title": ...}]).documents[0].chunk_ids
    for message in client.generate("Who ...?", top_k=3):
        print(message.text, end="")
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto import kvblend_pb2 as pb
from proto import kvblend_pb2_grpc as pb_grpc

TENANT_HEADER = "kvblend-tenant"


def channel_target(target: str) -> str:
    """A gRPC target for `target`: one address, a gRPC URI (`dns:///name:port`), or replicas as a comma
    list `host:port,host:port`, turned into an `ipv4:`/`ipv6:` list (names resolved once, here)."""
    if "," not in target:
        return target
    import socket

    addresses, families = [], set()
    for part in target.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"server address {part.strip()!r} in {target!r} is not host:port")
        host = host.strip("[]")
        try:
            family, *_, sockaddr = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0]
        except socket.gaierror as err:
            raise ValueError(f"server address {part.strip()!r}: cannot resolve {host!r} ({err})") from None
        families.add(family)
        addresses.append(f"[{sockaddr[0]}]:{port}" if family == socket.AF_INET6 else f"{sockaddr[0]}:{port}")
    if len(families) > 1:
        raise ValueError(f"servers {target!r} mix IPv4 and IPv6 addresses; list one kind")
    return ("ipv6:" if families == {socket.AF_INET6} else "ipv4:") + ",".join(addresses)


def retry_unavailable(call, retries: int, wait_s, on_retry=None):
    """`call()`; while it fails with UNAVAILABLE (a replica restarting, Redis down), again after
    `wait_s(attempt)` seconds, at most `retries` more times. Any other status, or the last failure, is raised;
    `on_retry(err)` sees each failure that is retried."""
    for attempt in range(retries + 1):
        try:
            return call()
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE or attempt == retries:
                raise
            if on_retry is not None:
                on_retry(err)
            time.sleep(wait_s(attempt))


class Client:
    def __init__(self, target: str, token: str | None = None, tenant: str | None = None,
                 tls_ca: Path | None = None):
        """`target`: see `channel_target`. Calls are spread over every address the target has (round robin);
        a call to a replica that dies fails with UNAVAILABLE, and a retry goes to one that answers."""
        options = [("grpc.max_receive_message_length", 32 << 20), ("grpc.max_send_message_length", 32 << 20),
                   ("grpc.lb_policy_name", "round_robin")]
        target = channel_target(target)
        if tls_ca is not None:
            credentials = grpc.ssl_channel_credentials(Path(tls_ca).read_bytes())
            self.channel = grpc.secure_channel(target, credentials, options)
        else:
            self.channel = grpc.insecure_channel(target, options)
        self.stub = pb_grpc.ChunkCacheStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.metadata: list[tuple[str, str]] = []
        if token:
            self.metadata.append(("authorization", f"Bearer {token}"))
        if tenant:
            self.metadata.append((TENANT_HEADER, tenant))

    def wait_ready(self, timeout: float = 60.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def ingest(self, documents: Iterable[dict], timeout: float | None = None) -> pb.IngestResponse:
        request = pb.IngestRequest(documents=[pb.Document(**d) for d in documents])
        return self.stub.IngestChunks(request, timeout=timeout, metadata=self.metadata)

    def retrieve(self, query: str, k: int = 0, timeout: float | None = None) -> pb.RetrieveResponse:
        request = pb.RetrieveRequest(query=query, k=k)
        return self.stub.Retrieve(request, timeout=timeout, metadata=self.metadata)

    def generate(self, query: str, chunk_ids: Iterable[str] = (), top_k: int = 0, mode: str = "",
                 ratio: float | None = None, max_new_tokens: int = 0, timeout: float | None = None,
                 documents: Iterable[dict] = (), temperature: float = 0.0, top_p: float | None = None,
                 seed: int | None = None, stop: Iterable[str] = ()):
        """The response stream: iterate it for `GenerateResponse`s; `.cancel()` stops the generation.
        `documents` are inline passages, dicts of text (and title, doc_id)."""
        request = pb.GenerateRequest(query=query, chunk_ids=list(chunk_ids), top_k=top_k, mode=mode,
                                     max_new_tokens=max_new_tokens, temperature=temperature, stop=list(stop),
                                     documents=[pb.Document(**d) for d in documents])
        if ratio is not None:
            request.ratio = ratio
        if top_p is not None:
            request.top_p = top_p
        if seed is not None:
            request.seed = seed
        return self.stub.Generate(request, timeout=timeout, metadata=self.metadata)

    def answer(self, query: str, **kwargs) -> Answer:
        """Generate and collect the whole stream."""
        started = time.perf_counter()
        return Answer.collect(self.generate(query, **kwargs), started=started)

    def delete(self, chunk_ids: Iterable[str], timeout: float | None = None) -> pb.DeleteResponse:
        return self.stub.DeleteChunks(pb.DeleteRequest(chunk_ids=list(chunk_ids)), timeout=timeout,
                                      metadata=self.metadata)

    def stats(self, timeout: float | None = None) -> pb.StatsResponse:
        return self.stub.Stats(pb.StatsRequest(), timeout=timeout, metadata=self.metadata)

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        response = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Answer:
    """A whole Generate stream: text, token ids, TTFT (server's and as the client saw it), report, finish."""

    def __init__(self):
        self.text = ""
        self.token_ids: list[int] = []
        self.ttft_s = 0.0
        self.client_ttft_s = 0.0
        self.report: pb.RequestReport | None = None
        self.finish: pb.Finish | None = None
        self.messages = 0

    @classmethod
    def collect(cls, stream: Iterator[pb.GenerateResponse], on_text=None,
                started: float | None = None) -> Answer:
        """Read the whole stream; `started` (perf_counter) is when the call was made, for the client TTFT."""
        answer = cls()
        started = time.perf_counter() if started is None else started
        for message in stream:
            if answer.messages == 0:
                answer.client_ttft_s = time.perf_counter() - started
                answer.ttft_s = message.ttft_s
                answer.report = message.report
            answer.messages += 1
            answer.text += message.text
            answer.token_ids.extend(message.token_ids)
            if on_text is not None and message.text:
                on_text(message.text)
            if message.HasField("finish"):
                answer.finish = message.finish
        return answer

    def as_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "ttft_s": self.ttft_s,
                "client_ttft_s": self.client_ttft_s,
                "report": MessageToDict(self.report, preserving_proto_field_name=True),
                "finish": MessageToDict(self.finish, preserving_proto_field_name=True)}


def format_report(answer: Answer) -> str:
    report, finish = answer.report, answer.finish
    label = f"blend@{report.ratio:g}" if report.mode == "blend" else report.mode
    hits = ", ".join(f"{tier} {count}" for tier, count in sorted(report.chunks_hit.items())) or "none"
    lines = [
        f"mode        {label}; {len(report.chunk_ids)} chunks, {report.prompt_tokens} prompt tokens "
        f"({report.chunk_tokens} in chunks)",
        f"ttft        {answer.ttft_s * 1000:.1f} ms at the server, {answer.client_ttft_s * 1000:.1f} ms here "
        f"(queue {report.queue_s * 1000:.1f}, retrieve {report.retrieve_s * 1000:.1f}, load wait "
        f"{report.load_wait_s * 1000:.1f}, compute {report.compute_s * 1000:.1f}, missing chunks "
        f"{report.missing_compute_s * 1000:.1f} ms; tier reads {report.load_s * 1000:.1f} ms)",
        f"chunks      hit per tier: {hits}; missing (recomputed) {report.chunks_missing} "
        f"({report.missing_tokens} tokens); tokens recomputed by blend {report.tokens_recomputed}",
    ]
    if report.quality.checked:
        q = report.quality
        lines.append(f"quality     first-token KL {q.kl:.4f}, agree {'yes' if q.agree else 'no'}"
                     f"{', answered from full prefill' if q.fell_back else ''}")
    if report.degraded_tiers:
        lines.append(f"degraded    {', '.join(report.degraded_tiers)} unavailable (KV recomputed)")
    if finish is not None:
        lines.append(f"finish      {finish.reason}: {finish.tokens} tokens in {finish.seconds:.2f} s")
    if report.chunk_ids:
        lines.append("chunk ids   " + " ".join(report.chunk_ids))
    return "\n".join(lines)
