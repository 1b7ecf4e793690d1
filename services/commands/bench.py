"""`kvblend bench` (GPU TTFT), `bench-store` (store tiers), `bench-service` (one server under load),
`bench-novel` (novel-chunk traffic) and `bench-cluster` (replicas under load, with faults): their flags
and the calls into services/bench/.

`bench` must parse and run on a GPU machine with torch and transformers but without faiss, redis-py or
gguf, so nothing here imports those (services/bench/gpu.py and store.py import them where used)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def cmd_bench(args: argparse.Namespace) -> int:
    from services.bench.gpu import BenchConfig, run

    return run(BenchConfig(
        shape=args.shape, chunks=tuple(int(c) for c in args.chunks.split(",")), repeats=args.repeats,
        ratios=tuple(float(r) for r in args.ratios.split(",")), redis_url=args.redis_url,
        json_out=Path(args.json_out), plot=_path(args.plot), profile=_path(args.profile),
        selectors=tuple(args.selectors.split(",")), layer_graphs=not args.no_layer_graphs,
    ))


def cmd_bench_store(args: argparse.Namespace) -> int:
    from services.bench.store import StoreBenchConfig, run

    return run(StoreBenchConfig(
        json_out=Path(args.json_out), redis_url=args.redis_url, layouts=tuple(args.layouts.split(",")),
        tokens=args.tokens, chunks=args.chunks, repeats=args.repeats, replay_requests=args.replay_requests,
        only=args.only, torch_threads=args.torch_threads, work_dir=_path(args.work_dir),
        redis_connections=args.redis_connections,
    ))


def cmd_bench_service(args: argparse.Namespace) -> int:
    if args.device == "cuda":
        from services.bench.service_gpu import GpuServiceBenchConfig
        from services.bench.service_gpu import run as run_gpu

        return run_gpu(GpuServiceBenchConfig(
            model=Path(args.model), redis_url=args.redis_url, duration=args.duration or 6.0,
            max_new_tokens=args.max_new_tokens or 4,
            json_out=Path(args.json_out), plot=_path(args.plot),
            scenarios=tuple(args.scenarios.split(",")),
        ))
    if args.dataset is None:
        raise ValueError("bench-service needs --dataset (a MuSiQue-shaped JSON) unless --device cuda")
    from services.bench.service import ServiceBenchConfig, run

    return run(ServiceBenchConfig(
        dataset=Path(args.dataset), server=args.server, token=args.token, model=args.model,
        cache_dir=args.cache_dir, redis_url=args.redis_url, clients=args.clients, duration=args.duration or 30.0,
        questions=args.questions, top_k=args.top_k, mode=args.mode, max_new_tokens=args.max_new_tokens or 8,
        timeout=args.timeout, json_out=_path(args.json_out), compare_batch_decode=args.compare_batch_decode,
    ))


def cmd_bench_novel(args: argparse.Namespace) -> int:
    from services.bench.novel import NovelBenchConfig, run

    return run(NovelBenchConfig(
        dataset=Path(args.dataset), model=args.model, cache_dir=args.cache_dir, queries=args.queries,
        window=args.window, novel=args.novel, popular=args.popular, popular_pool=args.popular_pool,
        chunk_tokens=args.chunk_tokens, cpu_bytes=args.cpu_bytes, max_new_tokens=args.max_new_tokens,
        json_out=_path(args.json_out),
    ))


def cmd_bench_model(args: argparse.Namespace) -> int:
    from services.bench.gpu import write_bench_model
    from services.settings import ModelConfig

    folder = write_bench_model(Path(args.folder), args.shape, ModelConfig.resolve(cache_dir=args.cache_dir).cache_dir)
    print(f"wrote {folder} ({args.shape}, random weights drawn at load: for timing only)")
    return 0


def cmd_bench_cluster(args: argparse.Namespace) -> int:
    from services.bench.cluster import ClusterBenchConfig, run

    return run(ClusterBenchConfig(
        dataset=Path(args.dataset), model=args.model, cache_dir=args.cache_dir, replicas=args.replicas,
        clients=args.clients, duration=args.duration, questions=args.questions, top_k=args.top_k,
        max_new_tokens=args.max_new_tokens, ingest_every=args.ingest_every, faults=args.faults,
        retries=args.retries, retry_wait=args.retry_wait, timeout=args.timeout, keep=args.keep,
        json_out=_path(args.json_out),
    ))


def cmd_bench_hardening(args: argparse.Namespace) -> int:
    from services.bench.hardening import HardeningBenchConfig, run

    return run(HardeningBenchConfig(
        server=args.server, model=args.model, cache_dir=args.cache_dir, ingests=args.ingests,
        long_tokens=args.long_tokens, long_query_items=args.long_query_items, long_deadline_s=args.long_deadline,
        json_out=_path(args.json_out),
    ))


def add_parsers(subparsers) -> None:
    from services.bench.gpu import SHAPES
    from services.bench.store import LAYOUTS
    from services.settings import SERVED_SELECTOR

    parser = subparsers.add_parser("bench", help="GPU TTFT of every mode and tier on an 8B-shaped model")
    parser.add_argument("--shape", choices=list(SHAPES), default="llama3-8b")
    parser.add_argument("--chunks", default="10,6,20", help="chunk counts; the first gets every row")
    parser.add_argument("--ratios", default="0.05,0.15,0.3")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--redis-url", default=None, help="also time chunk KV loaded from this Redis")
    parser.add_argument("--no-layer-graphs", action="store_true",
                        help="leave out the rows timed with the per-layer CUDA graphs (blend/graphs.py)")
    parser.add_argument("--selectors", default=SERVED_SELECTOR,
                        help="blend selectors timed; the first gets every row, the others blend@0.05 and @0.15 "
                             f"from the CPU tier (default: the served one, {SERVED_SELECTOR})")
    parser.add_argument("--json", dest="json_out", required=True)
    parser.add_argument("--plot", default=None)
    parser.add_argument("--profile", default=None, help="write a chrome trace of one pipelined request here")
    parser.set_defaults(func=cmd_bench)

    parser = subparsers.add_parser("bench-store",
                                   help="chunk-KV load throughput per store tier, admission replay")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--json", required=True, dest="json_out", help="where to write the figures")
    parser.add_argument("--layouts", default="smollm2,8b", help=f"comma-separated: {', '.join(LAYOUTS)}")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per chunk")
    parser.add_argument("--chunks", type=int, default=10, help="chunks per request (also measured: 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed loads per row (median and best shown)")
    parser.add_argument("--replay-requests", type=int, default=3000)
    parser.add_argument("--only", choices=["all", "throughput", "redis", "replay"], default="all",
                        help="redis: only the old against the new Redis read path, interleaved")
    parser.add_argument("--redis-connections", type=int, default=4, help="sockets of the batch Redis path")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="intra-op threads (default: torch's); 1 avoids thrashing on a busy machine")
    parser.add_argument("--work-dir", default=None,
                        help="where the disk tier's files go (default: system temp)")
    parser.set_defaults(func=cmd_bench_store)

    b = subparsers.add_parser("bench-service",
                              help="N concurrent clients for a fixed time: requests/s and TTFT")
    b.add_argument("--dataset", default=None,
                   help="MuSiQue-shaped JSON, e.g. ../shared/datasets/musique_dev.json (not with --device cuda)")
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: the GPU matrix (modes x tiers x 1 and 8 clients) on --model, a checkpoint "
                        "folder such as `kvblend bench-model` writes")
    b.add_argument("--scenarios", default="gpu,cpu,redis,mixed,mixed-fixed",
                   help="with --device cuda: chunk placements to run; `throughput` adds 1/4/16/32 clients with "
                        "64-token answers, full and blend@0.15 (batched decode)")
    b.add_argument("--plot", default=None, help="with --device cuda: a PNG of server TTFT per row")
    b.add_argument("--server", default=None, help="HOST:PORT of a running server (default: start one)")
    b.add_argument("--token", default=None, help="bearer token for --server")
    b.add_argument("--model", default="smollm2-135m", help="model of the server started here")
    b.add_argument("--cache-dir", default=None)
    b.add_argument("--redis-url", default=None)
    b.add_argument("--clients", type=int, default=16)
    b.add_argument("--duration", type=float, default=None,
                   help="seconds of load (default 30; with --device cuda, 6 per row)")
    b.add_argument("--questions", type=int, default=2,
                   help="questions asked in turn (their passages are ingested)")
    b.add_argument("--top-k", type=int, default=2)
    b.add_argument("--mode", default="blend", choices=["full", "prefix", "reuse", "blend"])
    b.add_argument("--max-new-tokens", type=int, default=None, help="default 8; with --device cuda, 4")
    b.add_argument("--timeout", type=float, default=None, help="per-call deadline (default none)")
    b.add_argument("--compare-batch-decode", action="store_true",
                   help="run the load on a server with batched decode off, then on, and print the ratio")
    b.add_argument("--json", dest="json_out", default="out/bench_service.json")
    b.set_defaults(func=cmd_bench_service)

    b = subparsers.add_parser("bench-novel",
                              help="queries of mostly never-seen chunks: CPU-tier hit rate and blend's speed-up "
                                   "over full per window (issue 21)")
    b.add_argument("--dataset", default="../shared/datasets/musique_dev.json",
                   help="MuSiQue-shaped JSON whose passages are the corpus")
    b.add_argument("--model", default="smollm2-135m", help="model of the server started here")
    b.add_argument("--cache-dir", default=None)
    b.add_argument("--queries", type=int, default=500, help="queries, each asked in blend and in full")
    b.add_argument("--window", type=int, default=50, help="queries per reported window")
    b.add_argument("--novel", type=int, default=4, help="chunks per query never used before")
    b.add_argument("--popular", type=int, default=2, help="chunks per query from the popular set")
    b.add_argument("--popular-pool", type=int, default=8, help="size of the popular set")
    b.add_argument("--chunk-tokens", type=int, default=64, help="the server's chunk size in tokens")
    b.add_argument("--cpu-bytes", type=int, default=64 << 20, help="the CPU tier's byte budget (default 64 MiB)")
    b.add_argument("--max-new-tokens", type=int, default=1)
    b.add_argument("--json", dest="json_out", default="out/bench_novel.json")
    b.set_defaults(func=cmd_bench_novel)

    b = subparsers.add_parser("bench-model",
                              help="write a timing-only checkpoint folder (random weights) of an 8B shape")
    b.add_argument("folder")
    b.add_argument("--shape", choices=list(SHAPES), default="llama3-8b")
    b.add_argument("--cache-dir", default=None, help="where the embedded model's tokenizer is converted")
    b.set_defaults(func=cmd_bench_model)

    b = subparsers.add_parser("bench-cluster",
                              help="replicas sharing one Redis under load, with Redis and replica faults")
    b.add_argument("--dataset", required=True, help="MuSiQue-shaped JSON, e.g. data/musique_sample.json")
    b.add_argument("--model", default="smollm2-135m", help="model of the replicas started here")
    b.add_argument("--cache-dir", default=None)
    b.add_argument("--replicas", type=int, default=2)
    b.add_argument("--clients", type=int, default=32)
    b.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    b.add_argument("--questions", type=int, default=2, help="questions asked in turn (their passages are ingested)")
    b.add_argument("--top-k", type=int, default=2)
    b.add_argument("--max-new-tokens", type=int, default=8)
    b.add_argument("--ingest-every", type=int, default=4, help="every Nth call of a client ingests (0: never)")
    b.add_argument("--faults", action="store_true", help="restart Redis, SIGKILL and restart a replica")
    b.add_argument("--retries", type=int, default=60, help="retries of a call that failed with UNAVAILABLE")
    b.add_argument("--retry-wait", type=float, default=0.5, help="seconds between retries")
    b.add_argument("--timeout", type=float, default=None, help="per-call deadline (default none)")
    b.add_argument("--keep", action="store_true", help="keep the run's folder (logs, Redis data)")
    b.add_argument("--json", dest="json_out", default="out/bench_cluster.json")
    b.set_defaults(func=cmd_bench_cluster)

    b = subparsers.add_parser("bench-hardening",
                              help="issue 19's starvation and head-of-line scenarios against a real server")
    b.add_argument("--server", default=None, help="HOST:PORT of a running server (default: start one here)")
    b.add_argument("--model", default="smollm2-135m", help="model of the server started here")
    b.add_argument("--cache-dir", default=None)
    b.add_argument("--ingests", type=int, default=110, help="tiny IngestChunks calls sent at once")
    b.add_argument("--long-tokens", type=int, default=1000, help="new tokens of the Generate streaming meanwhile")
    b.add_argument("--long-query-items", type=int, default=315,
                   help="sentences of the head-of-line query (about 9.5 tokens each: 315 is ~3,000 tokens)")
    b.add_argument("--long-deadline", type=float, default=2.0, help="deadline (s) of the head-of-line query")
    b.add_argument("--json", dest="json_out", default="out/bench_hardening.json")
    b.set_defaults(func=cmd_bench_hardening)
