"""`kvblend bench-novel`: does blend's gain decay when most chunks of every query are new?

Issue 21's "no decay under novel traffic" scenario (the failure LMCache users report in LMCache#4663:
speed-up falling to ~1x within 60-90 novel RAG queries). One `kvblend serve` is started with a CPU tier
too small for the corpus, over the disk tier. The passages of enough MuSiQue questions are ingested
through IngestChunks (their KV precomputed into the store; setup, not timed), cut into chunks of
`chunk_tokens`. The first `popular_pool` chunks are the popular set; every other chunk is used by one
query only. Query i asks question i with `novel` chunks never used before plus `popular` chunks of the
popular set (by chunk id, no retrieval, so the mix is exact), once in mode blend and once in mode
full (which goes first alternates), so every window holds both.

Per window of `window` queries: the CPU tier's share of the chunks the blend requests loaded (from each
report's chunks_hit; chunks the server chose to recompute instead are not loads), blend's and full's
median server TTFT, and blend's speed-up over full (the median of the per-query full/blend ratios).
The acceptance figure is the last window's speed-up over the first window's (issue 21: >= 0.8).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

MIB = 1 << 20


@dataclass(frozen=True)
class NovelBenchConfig:
    dataset: Path  # MuSiQue-shaped JSON
    model: str = "smollm2-135m"
    cache_dir: str | None = None
    queries: int = 500  # each asked in blend and in full
    window: int = 50
    novel: int = 4  # chunks per query never used before
    popular: int = 2  # chunks per query from the popular set
    popular_pool: int = 8  # size of the popular set
    chunk_tokens: int = 64  # the server's chunk size: small, so 500 query pairs fit in minutes on 2 cores
    cpu_bytes: int = 64 * MIB  # the CPU tier's budget: a few dozen chunks, far below the corpus
    max_new_tokens: int = 1  # TTFT is what is measured
    json_out: Path | None = Path("out/bench_novel.json")

    def __post_init__(self):
        if min(self.queries, self.window, self.novel, self.popular_pool, self.chunk_tokens, self.cpu_bytes) < 1:
            raise ValueError("--queries, --window, --novel, --popular-pool, --chunk-tokens and --cpu-bytes "
                             "must be positive")
        if not 0 <= self.popular <= self.popular_pool:
            raise ValueError(f"--popular {self.popular} must be between 0 and --popular-pool {self.popular_pool}")
        if self.queries < self.window:
            raise ValueError(f"--queries {self.queries} is less than one --window ({self.window})")


def ingest_chunks(client, items, dataset_name: str, needed: int) -> tuple[list[str], int]:
    """Ingest the questions' passages in file order until at least `needed` chunk ids exist; returns
    the chunk ids in ingest order and the passages ingested."""
    from retriever.sources import question_documents

    chunk_ids: list[str] = []
    batch: list[dict] = []
    passages = 0
    for document in question_documents(items, dataset_name):
        batch.append(asdict(document))
        if len(batch) == 10:
            chunk_ids += [c for d in client.ingest(batch, timeout=600).documents for c in d.chunk_ids]
            passages += len(batch)
            batch = []
            if len(chunk_ids) >= needed:
                break
    if batch and len(chunk_ids) < needed:
        chunk_ids += [c for d in client.ingest(batch, timeout=600).documents for c in d.chunk_ids]
        passages += len(batch)
    if len(chunk_ids) < needed:
        raise ValueError(f"the dataset gives {len(chunk_ids)} chunks of {needed} needed (use fewer --queries "
                         "or --novel, or a smaller --chunk-tokens)")
    return chunk_ids, passages


def query_chunks(index: int, config: NovelBenchConfig, pool: list[str], novel: list[str]) -> list[str]:
    """Query `index`'s chunk ids: its own `novel` chunks, then `popular` of the pool in turn."""
    own = novel[index * config.novel:(index + 1) * config.novel]
    popular = [pool[(index * config.popular + j) % len(pool)] for j in range(config.popular)]
    return own + popular


def ask(client, question: str, chunk_ids: list[str], mode: str, max_new_tokens: int) -> dict:
    from services.client import Answer

    began = time.perf_counter()
    answer = Answer.collect(client.generate(question, chunk_ids=chunk_ids, mode=mode,
                                            max_new_tokens=max_new_tokens, timeout=600), started=began)
    report = answer.report
    return {"mode": mode, "server_ttft_s": answer.ttft_s, "client_ttft_s": answer.client_ttft_s,
            "chunks_hit": dict(report.chunks_hit), "chunks_missing": report.chunks_missing,
            "prompt_tokens": report.prompt_tokens}


def summarize_window(index: int, pairs: list[dict]) -> dict:
    """One window's figures from its query pairs ({"blend": record, "full": record})."""
    hits: dict[str, int] = {}
    for pair in pairs:
        for tier, count in pair["blend"]["chunks_hit"].items():
            hits[tier] = hits.get(tier, 0) + count
    loaded = sum(hits.values()) + sum(pair["blend"]["chunks_missing"] for pair in pairs)
    blend = [pair["blend"]["server_ttft_s"] for pair in pairs]
    full = [pair["full"]["server_ttft_s"] for pair in pairs]
    return {
        "window": index, "queries": len(pairs), "chunks_loaded": loaded, "chunks_hit": hits,
        "cpu_hit_rate": hits.get("cpu", 0) / loaded if loaded else 0.0,
        "blend_ttft_p50_s": statistics.median(blend), "full_ttft_p50_s": statistics.median(full),
        "speedup": statistics.median(f / b for f, b in zip(full, blend)),
    }


def format_table(windows: list[dict]) -> str:
    header = f"{'window':>6}  {'queries':>7}  {'cpu hit':>7}  {'blend TTFT p50':>14}  {'full TTFT p50':>13}  speed-up"
    lines = [header]
    for w in windows:
        lines.append(f"{w['window']:>6}  {w['queries']:>7}  {w['cpu_hit_rate']:>7.2f}  "
                     f"{1000 * w['blend_ttft_p50_s']:>11.1f} ms  {1000 * w['full_ttft_p50_s']:>10.1f} ms  "
                     f"{w['speedup']:>7.2f}x")
    return "\n".join(lines)


def measure(config: NovelBenchConfig, target: str) -> dict:
    """Ingest, warm up, then the query pairs; the windows' figures and every pair's records."""
    from retriever.sources import read_musique
    from services.client import Client

    items = read_musique(Path(config.dataset))
    with Client(target) as client:
        client.wait_ready(60)
        began = time.perf_counter()
        chunk_ids, passages = ingest_chunks(client, items, Path(config.dataset).name,
                                            config.popular_pool + config.queries * config.novel)
        ingest_s = time.perf_counter() - began
        print(f"ingested {passages} passages ({len(chunk_ids)} chunks) in {ingest_s:.0f} s", file=sys.stderr,
              flush=True)
        pool, novel = chunk_ids[:config.popular_pool], chunk_ids[config.popular_pool:]
        # Warm-up, not timed: the one-time costs of both paths, and two uses of each popular chunk, so the
        # first window starts with the popular set admitted to the CPU tier (the state that should last).
        for _ in range(2):
            ask(client, items[0].question, pool, "blend", config.max_new_tokens)
        ask(client, items[0].question, pool, "full", config.max_new_tokens)
        pairs, windows = [], []
        began = time.perf_counter()
        for index in range(config.queries):
            question = items[index % len(items)].question
            chunks = query_chunks(index, config, pool, novel)
            modes = ("blend", "full") if index % 2 == 0 else ("full", "blend")
            pairs.append({mode: ask(client, question, chunks, mode, config.max_new_tokens) for mode in modes})
            if len(pairs) % config.window == 0:
                windows.append(summarize_window(len(windows), pairs[-config.window:]))
                w = windows[-1]
                print(f"window {w['window']}: cpu hit {w['cpu_hit_rate']:.2f}, blend {1000 * w['blend_ttft_p50_s']:.0f} "
                      f"ms, full {1000 * w['full_ttft_p50_s']:.0f} ms, {w['speedup']:.2f}x "
                      f"({time.perf_counter() - began:.0f} s)", file=sys.stderr, flush=True)
        stats = client.stats()
    first, last = windows[0]["speedup"], windows[-1]["speedup"]
    return {"ingest_s": ingest_s, "passages": passages, "chunks": len(chunk_ids), "popular_chunks": pool,
            "windows": windows, "last_over_first_speedup": last / first if first else None,
            "server": {"completed": stats.completed, "failed": stats.failed}, "pairs": pairs}


def run(config: NovelBenchConfig) -> int:
    """The benchmark as a program: starts a server, prints the window table, writes JSON."""
    from services.bench.launch import start_local_server

    load_before = os.getloadavg()
    folder = Path(tempfile.mkdtemp(prefix="kvblend-novel-"))
    try:
        server = start_local_server(folder, config.model, config.cache_dir, None,
                                    {"chunk_tokens": config.chunk_tokens}, {"cpu_bytes": config.cpu_bytes})
        print(f"started kvblend serve ({config.model}, CPU tier {config.cpu_bytes / MIB:.0f} MiB over disk) on "
              f"{server.target}", file=sys.stderr, flush=True)
        try:
            result = measure(config, server.target)
        finally:
            server.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(format_table(result["windows"]))
    print(f"speed-up, last window / first: {result['last_over_first_speedup']:.2f} (issue 21 asks >= 0.8)")
    record = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "result": result,
    }
    if config.json_out:
        config.json_out.parent.mkdir(parents=True, exist_ok=True)
        config.json_out.write_text(json.dumps(record, indent=1))
        print(f"wrote {config.json_out}", file=sys.stderr)
    return 0
