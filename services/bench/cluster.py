"""`kvblend bench-cluster`: two replicas sharing one Redis under load, with faults injected.

Starts a redis-server of its own (append-only file on, so a restart keeps its data) and `--replicas`
`kvblend serve --catalog redis` processes on fixed ports. Setup (not timed): the passages of the first
`--questions` MuSiQue-shaped questions are ingested through the first replica, and every question is
asked once through the last one. Then `--clients` threads, each with one channel spread round robin
over every replica, ask the questions in turn (retrieval top-k) for `--duration` seconds; every
`--ingest-every`-th call of a client ingests a new document instead, so writes land during the faults.

With `--faults`, at a quarter of the run Redis is restarted (SIGTERM, then started again on the same
port and folder) and at half of it the last replica is killed with SIGKILL and started again on its
port. A call that fails with UNAVAILABLE is retried (up to `--retries` times, `--retry-wait` apart); a
call that fails otherwise, or runs out of retries, is a failed RPC. Afterwards the run checks that
every chunk whose ingest succeeded has its catalog record and every KV entry in Redis, and that the
killed replica answers again. Prints a table and writes JSON.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from services.bench.service import drive, percentile


@dataclass(frozen=True)
class ClusterBenchConfig:
    dataset: Path  # MuSiQue-shaped JSON
    model: str = "smollm2-135m"  # model of the replicas started here
    cache_dir: str | None = None
    replicas: int = 2
    clients: int = 32
    duration: float = 60.0  # seconds of load
    questions: int = 2  # asked in turn; their passages are ingested
    top_k: int = 2
    max_new_tokens: int = 8
    ingest_every: int = 4  # every Nth call of a client ingests (0: never)
    faults: bool = False  # restart Redis, SIGKILL and restart a replica
    retries: int = 60  # of a call that failed with UNAVAILABLE
    retry_wait: float = 0.5  # seconds between retries
    timeout: float | None = None  # per-call deadline
    keep: bool = False  # keep the run's folder (logs, Redis data)
    json_out: Path | None = Path("out/bench_cluster.json")

    def __post_init__(self):
        if self.clients < 1 or self.duration <= 0 or self.questions < 1 or self.replicas < 2:
            raise ValueError("--clients, --duration and --questions must be positive and --replicas at least 2")


class Cluster:
    """A Redis of its own and `kvblend serve --catalog redis` replicas on fixed ports, to kill and restart."""

    def __init__(self, folder: Path, model: str, replicas: int, cache_dir: str | None = None,
                 config: dict | None = None):
        from services.bench.launch import RedisProcess, free_port

        self.folder = folder
        self.model = model
        self.cache_dir = cache_dir
        self.config = config or {}
        self.redis = RedisProcess(folder / "redis")
        self.redis.start()
        self.prefix = "kvblend:"
        self.ports = [free_port() for _ in range(replicas)]
        self.servers: list = [None] * replicas
        starters = [threading.Thread(target=self.start, args=(i,)) for i in range(replicas)]
        for thread in starters:
            thread.start()
        for thread in starters:
            thread.join()
        if not all(self.servers):
            self.close()
            raise RuntimeError(f"not every replica started; see {folder}/replica-*.err")

    @property
    def target(self) -> str:
        return ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def start(self, index: int) -> None:
        from services.bench.launch import ServerProcess

        sections = {"server": {"catalog": "redis"},
                    "store": {"disk_path": "", "redis_url": self.redis.url, "redis_prefix": self.prefix}}
        for section, values in self.config.items():
            sections.setdefault(section, {}).update(values)
        config = self.folder / f"replica-{index}.toml"
        config.write_text("".join(f"[{section}]\n" + "".join(f"{key} = {json.dumps(value)}\n"
                                                             for key, value in values.items())
                                  for section, values in sections.items()))
        args = ["--port", str(self.ports[index]), "--model", self.model,
                "--data-dir", str(self.folder / f"replica-{index}"), "--config", str(config)]
        if self.cache_dir:
            args += ["--cache-dir", self.cache_dir]
        try:
            self.servers[index] = ServerProcess(args, self.folder / f"replica-{index}.err")
        except RuntimeError as err:
            print(f"replica {index}: {err}", file=sys.stderr)

    def kill(self, index: int) -> None:
        server = self.servers[index]
        server.process.kill()
        server.process.wait()

    def close(self) -> None:
        for server in self.servers:
            if server is not None and server.alive():
                server.stop()
        self.redis.stop()


def run_load(cluster: Cluster, questions: list[str], config: ClusterBenchConfig,
             faults: list) -> dict:
    import grpc

    from services.client import Answer, Client, retry_unavailable

    ingested: list[str] = []
    lock = threading.Lock()

    def call_with_retries(fn, record: dict):
        failures = record.setdefault("attempt_failures", [])
        try:
            return retry_unavailable(fn, config.retries, lambda _: config.retry_wait,
                                     lambda err: failures.append(err.code().name))
        except grpc.RpcError as err:
            failures.append(err.code().name)
            record.update(ok=False, code=err.code().name, details=(err.details() or "")[:300])
            return None

    def one_call(client, index: int, turn: int, began: float) -> dict:
        record = {"ok": True}
        if config.ingest_every and (turn + index) % config.ingest_every == 0:  # staggered over clients
            record["kind"] = "ingest"
            text = (f"Load note {index}-{turn}: replica test document number {turn} written by client "
                    f"{index} while faults are injected into the cluster.")
            response = call_with_retries(lambda: client.ingest(
                [{"text": text, "title": f"load {index}-{turn}", "doc_id": f"load-{index}-{turn}"}],
                timeout=config.timeout), record)
            if response is not None:
                with lock:
                    ingested.extend(response.documents[0].chunk_ids)
            return record
        record["kind"] = "generate"
        question = questions[(index + turn) % len(questions)]

        def ask():
            started = time.perf_counter()
            stream = client.generate(question, top_k=config.top_k, max_new_tokens=config.max_new_tokens,
                                     timeout=config.timeout)
            return Answer.collect(stream, started=started)

        answer = call_with_retries(ask, record)
        if answer is not None:
            record.update(client_ttft_s=answer.client_ttft_s, server_ttft_s=answer.ttft_s,
                          chunks_hit=dict(answer.report.chunks_hit), chunks_missing=answer.report.chunks_missing)
        return record

    injectors: list[threading.Thread] = []

    def start_faults(began: float) -> None:
        if config.faults:
            injectors.append(threading.Thread(target=_inject, args=(cluster, faults, began, config.duration),
                                              daemon=True))
            injectors[0].start()

    records, began = drive(config.clients, config.duration, lambda: Client(cluster.target), one_call, start_faults)
    for injector in injectors:
        injector.join()
    wall = max((r["end"] for r in records), default=began) - began
    generated = [r for r in records if r["kind"] == "generate" and r["ok"]]
    failed = [r for r in records if not r["ok"]]
    retried = [r for r in records if r.get("attempt_failures") and r["ok"]]
    codes: dict[str, int] = {}
    for r in records:
        for code in r.get("attempt_failures", []):
            codes[code] = codes.get(code, 0) + 1
    per_client = [sum(1 for r in records if r["client"] == index) for index in range(config.clients)]
    hits: dict[str, int] = {}
    for r in generated:
        for tier, count in r["chunks_hit"].items():
            hits[tier] = hits.get(tier, 0) + count
    return {
        "calls": len(records), "generate_ok": len(generated),
        "ingest_ok": sum(1 for r in records if r["kind"] == "ingest" and r["ok"]),
        "failed_rpcs": len(failed), "failures": sorted({f"{r['code']}: {r['details']}" for r in failed})[:10],
        "retried_then_ok": len(retried), "failed_attempts_by_code": codes,
        "wall_s": wall, "requests_per_s": len(generated) / wall if wall else 0.0,
        "client_ttft_p50_s": percentile([r["client_ttft_s"] for r in generated], 0.50),
        "client_ttft_p99_s": percentile([r["client_ttft_s"] for r in generated], 0.99),
        "server_ttft_p50_s": percentile([r["server_ttft_s"] for r in generated], 0.50),
        "server_ttft_p99_s": percentile([r["server_ttft_s"] for r in generated], 0.99),
        "latency_p99_s": percentile([r["latency_s"] for r in records if r["ok"]], 0.99),
        "chunks_hit": hits, "chunks_missing": sum(r["chunks_missing"] for r in generated),
        "calls_per_client": [min(per_client), max(per_client)],
        "ingested_chunk_ids": sorted(set(ingested)),
    }


def _inject(cluster: Cluster, faults: list, began: float, duration: float) -> None:
    """Redis restarted at a quarter of the run, the last replica SIGKILLed and restarted at half."""
    def at(fraction: float) -> None:
        time.sleep(max(0.0, began + fraction * duration - time.perf_counter()))

    at(0.25)
    t0 = time.perf_counter()
    cluster.redis.restart()
    faults.append({"fault": "redis restarted (SIGTERM, start)", "at_s": t0 - began,
                   "down_s": time.perf_counter() - t0})
    at(0.5)
    victim = len(cluster.servers) - 1
    t0 = time.perf_counter()
    cluster.kill(victim)
    cluster.start(victim)
    up = cluster.servers[victim] is not None and cluster.servers[victim].alive()
    faults.append({"fault": f"replica {victim} killed (SIGKILL) and restarted", "at_s": t0 - began,
                   "serving_again_after_s": time.perf_counter() - t0 if up else None})


def check_redis(cluster: Cluster, chunk_ids: list[str]) -> dict:
    """Every chunk's catalog record and all of its KV entries are in Redis."""
    import redis

    from services.serving.catalog import shared_prefix
    from services.settings import DEFAULT_TENANT
    from store.chunks import ChunkStore
    from store.redis_tier import RedisTier
    from store.tiered import TieredStore

    client = redis.Redis.from_url(cluster.redis.url)
    store = ChunkStore(TieredStore([RedisTier(cluster.redis.url, cluster.prefix)], [None]))
    lost = []
    try:
        for cid in chunk_ids:
            record = client.hgetall(shared_prefix(cluster.prefix, DEFAULT_TENANT) + f"chunk:{cid}")
            keys = [k for k in record.get(b"kv_keys", b"").decode().split("\n") if k]
            if not record or not keys or not all(store.contains(key) for key in keys):
                lost.append(cid)
    finally:
        client.close()
    return {"chunks_checked": len(chunk_ids), "chunks_lost": lost}


def format_table(result: dict, config: ClusterBenchConfig) -> str:
    rows = [
        ("replicas / clients / duration (s)", f"{config.replicas} / {config.clients} / {config.duration:g}"),
        ("calls (generate ok, ingest ok)", f"{result['calls']} ({result['generate_ok']}, {result['ingest_ok']})"),
        ("failed RPCs (after retries)", result["failed_rpcs"]),
        ("calls retried, then ok", result["retried_then_ok"]),
        ("failed attempts by code", ", ".join(f"{c} {n}" for c, n in sorted(result["failed_attempts_by_code"].items()))
         or "none"),
        ("generate requests/s", f"{result['requests_per_s']:.2f}"),
        ("TTFT p50 / p99, client (s)", f"{result['client_ttft_p50_s']:.3f} / {result['client_ttft_p99_s']:.3f}"),
        ("TTFT p50 / p99, server (s)", f"{result['server_ttft_p50_s']:.3f} / {result['server_ttft_p99_s']:.3f}"),
        ("chunk hits per tier", ", ".join(f"{t} {n}" for t, n in sorted(result["chunks_hit"].items()))),
        ("chunks computed on a miss", result["chunks_missing"]),
        ("chunks checked in Redis / lost", f"{result['redis']['chunks_checked']} / "
                                           f"{len(result['redis']['chunks_lost'])}"),
        ("calls per client, min / max", f"{result['calls_per_client'][0]} / {result['calls_per_client'][1]}"),
        ("last replica answers after the run", result["replica_back"]),
    ]
    rows += [(f"fault at {f['at_s']:.1f} s", f"{f['fault']}: " + ", ".join(
        f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in f.items() if k not in ("fault", "at_s")))
        for f in result["faults"]]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


def run(config: ClusterBenchConfig) -> int:
    """The benchmark as a program: prints its table, writes JSON; 0 when nothing failed or was lost."""
    from retriever.sources import question_documents, read_musique
    from services.client import Client

    items = read_musique(Path(config.dataset), config.questions)
    questions = [item.question for item in items]
    folder = Path(tempfile.mkdtemp(prefix="kvblend-cluster-"))
    load_before = os.getloadavg()
    cluster = Cluster(folder, config.model, config.replicas, config.cache_dir,
                      {"server": {"default_max_new_tokens": config.max_new_tokens}})
    print(f"started Redis on {cluster.redis.url} and {config.replicas} replicas on {cluster.target}",
          file=sys.stderr, flush=True)
    faults: list = []
    try:
        first, last = (f"127.0.0.1:{port}" for port in (cluster.ports[0], cluster.ports[-1]))
        documents = [asdict(d) for d in question_documents(items, Path(config.dataset).name)]
        setup_ids = []
        with Client(first) as client:
            for start in range(0, len(documents), 10):
                response = client.ingest(documents[start:start + 10])
                setup_ids += [cid for doc in response.documents for cid in doc.chunk_ids]
        with Client(last) as client:  # one-time costs outside the run; chunks come from Redis there
            warm = [client.answer(question, top_k=config.top_k, max_new_tokens=config.max_new_tokens)
                    for question in questions]
        print(f"ingested {len(documents)} passages through replica 0; warmed replica {config.replicas - 1}: "
              f"{sum(a.report.chunks_missing for a in warm)} chunks computed there", file=sys.stderr, flush=True)
        result = run_load(cluster, questions, config, faults)
        result["faults"] = faults
        result["setup_chunks_computed_on_last_replica"] = sum(a.report.chunks_missing for a in warm)
        with Client(last) as client:
            client.wait_ready(60)
            answer = client.answer(questions[0], top_k=config.top_k, max_new_tokens=config.max_new_tokens)
            result["replica_back"] = bool(answer.finish) and answer.report.chunks_missing == 0
        result["redis"] = check_redis(cluster, sorted(set(setup_ids) | set(result["ingested_chunk_ids"])))
    finally:
        cluster.close()
        if config.keep:
            print(f"kept {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    print(format_table(result, config))
    record = {
        "command": "kvblend bench-cluster " + " ".join(sys.argv[2:]),
        "args": asdict(config),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "result": {k: v for k, v in result.items() if k != "ingested_chunk_ids"},
    }
    if config.json_out:
        config.json_out.parent.mkdir(parents=True, exist_ok=True)
        config.json_out.write_text(json.dumps(record, indent=2, default=str))
        print(f"wrote {config.json_out}", file=sys.stderr)
    healthy = result["failed_rpcs"] == 0 and not result["redis"]["chunks_lost"] and result["replica_back"]
    return 0 if healthy else 1
