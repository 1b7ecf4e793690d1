"""`kvblend bench-service`: N concurrent clients asking a server questions for a fixed time.

Starts `kvblend serve` (or uses `--server`), ingests the passages of the first few questions of a
MuSiQue-shaped file (setup, not timed), warms every question once, then runs `--clients` threads,
each with its own channel, each asking the questions in turn (retrieval top-k, `--mode`) until
`--duration` seconds have passed; calls started before then are waited for and counted. Prints a
table and writes JSON: requests/s, failed calls, TTFT as the client saw it (call start to first
message) and as the server measured it, whole-call latency, and what the reports said.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class ServiceBenchConfig:
    dataset: Path  # MuSiQue-shaped JSON
    server: str | None = None  # HOST:PORT of a running server; None starts one here
    token: str | None = None  # bearer token for `server` (never written to the JSON)
    model: str = "smollm2-135m"  # model of the server started here
    cache_dir: str | None = None
    redis_url: str | None = None
    clients: int = 16
    duration: float = 30.0  # seconds of load
    questions: int = 2  # asked in turn; their passages are ingested
    top_k: int = 2
    mode: str = "blend"
    max_new_tokens: int = 8
    timeout: float | None = None  # per-call deadline
    json_out: Path | None = Path("out/bench_service.json")
    # Run the load twice in this invocation, on a server with batched decode off and then on (the same
    # questions, fresh servers), and print the ratio: the batching's gain measured in one run.
    compare_batch_decode: bool = False

    def __post_init__(self):
        if self.clients < 1 or self.duration <= 0 or self.questions < 1:
            raise ValueError("--clients, --duration and --questions must be positive")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def drive(clients: int, duration: float, connect, call, on_start=None) -> tuple[list[dict], float]:
    """`clients` threads, each with its own `connect()` client, each doing `call(client, index, turn, began)`
    (a dict for the call's record) until `duration` seconds have passed; calls started before then are
    waited for. `on_start(began)` runs once the clients are released. Returns the records and the start."""
    records: list[dict] = []
    lock = threading.Lock()
    stop_at = [0.0]
    # The deadline is set by the barrier itself, before any client is released, so no client can read
    # it unset and end at once.
    start_line = threading.Barrier(clients + 1, action=lambda: stop_at.__setitem__(0, time.perf_counter() + duration))

    def client_loop(index: int) -> None:
        with connect() as client:
            client.wait_ready(60)
            start_line.wait()
            turn = 0
            while time.perf_counter() < stop_at[0]:
                turn += 1
                began = time.perf_counter()
                record = {"client": index, "start": began, **call(client, index, turn, began)}
                record["end"] = time.perf_counter()
                record["latency_s"] = record["end"] - began
                with lock:
                    records.append(record)

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    start_line.wait()
    began = stop_at[0] - duration
    if on_start is not None:
        on_start(began)
    for thread in threads:
        thread.join()
    return records, began


def run_load(target: str, questions: list[str], config: ServiceBenchConfig) -> dict:
    import grpc

    from services.client import Answer, Client

    def ask(client, index: int, turn: int, began: float) -> dict:
        question = questions[(index + turn) % len(questions)]
        try:
            stream = client.generate(question, top_k=config.top_k, mode=config.mode,
                                     max_new_tokens=config.max_new_tokens, timeout=config.timeout)
            answer = Answer.collect(stream, started=began)
        except grpc.RpcError as err:
            return {"ok": False, "code": err.code().name, "details": err.details()}
        report = answer.report
        return {"ok": True, "client_ttft_s": answer.client_ttft_s, "server_ttft_s": answer.ttft_s,
                "tokens": answer.finish.tokens if answer.finish else 0, "queue_s": report.queue_s,
                "chunks_hit": dict(report.chunks_hit), "chunks_missing": report.chunks_missing,
                "prompt_tokens": report.prompt_tokens}

    records, began = drive(config.clients, config.duration, lambda: Client(target, token=config.token), ask)
    wall = max((r["end"] for r in records), default=began) - began
    return summarize(records, wall)


def summarize(records: list[dict], wall: float) -> dict:
    """The figures of a load run (or of several rounds together: their records and summed wall time)."""
    ok = [r for r in records if r["ok"]]
    failed = [r for r in records if not r["ok"]]
    hits: dict[str, int] = {}
    for r in ok:
        for tier, count in r["chunks_hit"].items():
            hits[tier] = hits.get(tier, 0) + count
    return {
        "requests": len(records), "succeeded": len(ok), "failed": len(failed),
        "failures": sorted({f"{r['code']}: {r['details']}" for r in failed})[:10],
        "wall_s": wall, "requests_per_s": len(ok) / wall if wall else 0.0,
        "tokens_per_s": sum(r["tokens"] for r in ok) / wall if wall else 0.0,
        "client_ttft_p50_s": percentile([r["client_ttft_s"] for r in ok], 0.50),
        "client_ttft_p99_s": percentile([r["client_ttft_s"] for r in ok], 0.99),
        "server_ttft_p50_s": percentile([r["server_ttft_s"] for r in ok], 0.50),
        "server_ttft_p99_s": percentile([r["server_ttft_s"] for r in ok], 0.99),
        "latency_p50_s": percentile([r["latency_s"] for r in ok], 0.50),
        "latency_p99_s": percentile([r["latency_s"] for r in ok], 0.99),
        "queue_p50_s": percentile([r["queue_s"] for r in ok], 0.50),
        "prompt_tokens_mean": statistics.fmean(r["prompt_tokens"] for r in ok) if ok else 0.0,
        "chunks_hit": hits, "chunks_missing": sum(r["chunks_missing"] for r in ok),
        "records": records,
    }


def _pair(result: dict, name: str) -> str:
    return f"{result[name + '_p50_s']:.3f} / {result[name + '_p99_s']:.3f}"


def format_table(result: dict, config: ServiceBenchConfig) -> str:
    rows = [
        ("clients", config.clients), ("duration (s)", config.duration),
        ("mode", config.mode if config.mode != "blend" else "blend (server's ratio)"),
        ("requests", result["requests"]), ("failed", result["failed"]),
        ("requests/s", f"{result['requests_per_s']:.2f}"), ("tokens/s", f"{result['tokens_per_s']:.1f}"),
        ("TTFT p50 / p99, client (s)", _pair(result, "client_ttft")),
        ("TTFT p50 / p99, server (s)", _pair(result, "server_ttft")),
        ("latency p50 / p99 (s)", _pair(result, "latency")),
        ("queue wait p50 (s)", f"{result['queue_p50_s']:.3f}"),
        ("prompt tokens (mean)", f"{result['prompt_tokens_mean']:.0f}"),
        ("chunk hits per tier", ", ".join(f"{t} {n}" for t, n in sorted(result["chunks_hit"].items()))),
        ("chunks missing", result["chunks_missing"]),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


def run(config: ServiceBenchConfig) -> int:
    """The benchmark as a program: prints its table, writes JSON; 0 when no call failed."""
    from retriever.sources import read_musique

    items = read_musique(Path(config.dataset), config.questions)
    load_before = os.getloadavg()
    if config.compare_batch_decode:
        if config.server is not None:
            raise ValueError("--compare-batch-decode starts its own servers; leave out --server")
        runs = _compare_batch_decode(config, items)
        result = {"batch_decode_off": runs[False], "batch_decode_on": runs[True]}
        for name in ("tokens_per_s", "requests_per_s"):
            off = runs[False][name]
            result[f"{name}_on_over_off"] = runs[True][name] / off if off else None
        for flag in (False, True):
            print(f"batch_decode = {str(flag).lower()}:\n{format_table(runs[flag], config)}")
        print(f"batched decode, on / off: tokens/s {result['tokens_per_s_on_over_off']:.2f}x, "
              f"requests/s {result['requests_per_s_on_over_off']:.2f}x")
    else:
        result = _measure(config, items, None)
        print(format_table(result, config))
    record = {
        "args": {k: v for k, v in asdict(config).items() if k != "token"},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "result": result,
    }
    if config.json_out:
        config.json_out.parent.mkdir(parents=True, exist_ok=True)
        config.json_out.write_text(json.dumps(record, indent=2, default=str))
        print(f"wrote {config.json_out}", file=sys.stderr)
    runs = [result["batch_decode_off"], result["batch_decode_on"]] if config.compare_batch_decode else [result]
    return 0 if all(r["failed"] == 0 for r in runs) else 1


def _compare_batch_decode(config: ServiceBenchConfig, items, rounds: int = 4) -> dict[bool, dict]:
    """Two servers, batched decode off and on, both ingested and warmed; then the load alternates between
    them in `rounds` rounds (off-on, on-off, ...), so a busy spell of the machine hits both alike."""
    from services.bench.launch import start_local_server

    servers, folders = {}, []
    try:
        for flag in (False, True):
            folders.append(Path(tempfile.mkdtemp(prefix="kvblend-bench-")))
            servers[flag] = start_local_server(folders[-1], config.model, config.cache_dir, config.redis_url,
                                               {"batch_decode": flag})
            print(f"started kvblend serve ({config.model}, batch_decode {flag}) on {servers[flag].target}",
                  file=sys.stderr, flush=True)
            _prepare(servers[flag].target, config, items)
        questions = [item.question for item in items]
        parts: dict[bool, list[dict]] = {False: [], True: []}
        share = replace(config, duration=config.duration / rounds)
        for turn in range(rounds):
            for flag in (False, True) if turn % 2 == 0 else (True, False):
                parts[flag].append(run_load(servers[flag].target, questions, share))
                print(f"round {turn + 1}/{rounds}, batch_decode {flag}: {parts[flag][-1]['tokens_per_s']:.1f} "
                      "tokens/s", file=sys.stderr, flush=True)
    finally:
        for server in servers.values():
            server.stop()
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
    return {flag: summarize([r for part in runs for r in part["records"]], sum(part["wall_s"] for part in runs))
            for flag, runs in parts.items()}


def _prepare(target: str, config: ServiceBenchConfig, items) -> None:
    """Ingest the questions' passages (not timed) and warm every question once."""
    from retriever.sources import question_documents
    from services.client import Client

    with Client(target, token=config.token) as client:
        client.wait_ready(30)
        documents = [asdict(d) for d in question_documents(items, Path(config.dataset).name)]
        began = time.perf_counter()
        for first in range(0, len(documents), 10):
            client.ingest(documents[first:first + 10])
        print(f"ingested {len(documents)} passages in {time.perf_counter() - began:.0f} s; warming up",
              file=sys.stderr, flush=True)
        for item in items:  # first use of every chunk, and the one-time costs, outside the run
            client.answer(item.question, top_k=config.top_k, mode=config.mode, max_new_tokens=config.max_new_tokens)


def _measure(config: ServiceBenchConfig, items, server_settings: dict | None) -> dict:
    """Ingest the questions' passages, warm up, run the load; on `config.server`, or on a server started
    here (with `server_settings`) and stopped after."""
    from services.bench.launch import start_local_server
    from services.client import Client

    questions = [item.question for item in items]
    server = folder = None
    target = config.server
    if target is None:
        folder = Path(tempfile.mkdtemp(prefix="kvblend-bench-"))
        server = start_local_server(folder, config.model, config.cache_dir, config.redis_url, server_settings)
        target = server.target
        print(f"started kvblend serve ({config.model}, {server_settings or 'defaults'}) on {target}",
              file=sys.stderr, flush=True)
    try:
        _prepare(target, config, items)
        with Client(target, token=config.token) as client:
            result = run_load(target, questions, config)
            stats = client.stats()
            result["server_stats"] = {"failed": stats.failed, "rejected": stats.rejected,
                                      "cancelled": stats.cancelled, "completed": stats.completed}
    finally:
        if server is not None:
            server.stop()
            shutil.rmtree(folder, ignore_errors=True)
    return result
