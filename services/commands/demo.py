"""`kvblend demo`: the service end to end on the embedded model (services/bench/demo.py)."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_demo(args: argparse.Namespace) -> int:
    from services.bench.demo import DemoConfig, run_demo

    return run_demo(DemoConfig(dataset=Path(args.dataset), questions=args.questions, top_k=args.top_k,
                               max_new_tokens=args.max_new_tokens, batch=args.batch, model=args.model,
                               cache_dir=args.cache_dir, redis_url=args.redis_url))


def add_parsers(subparsers) -> None:
    d = subparsers.add_parser("demo",
                              help="start a server, ingest MuSiQue passages, ask one question in blend mode")
    d.add_argument("--dataset", required=True,
                   help="MuSiQue-shaped JSON, e.g. ../shared/datasets/musique_dev.json")
    d.add_argument("--questions", type=int, default=2, help="questions whose passages are ingested")
    d.add_argument("--top-k", type=int, default=4, help="chunks retrieved for the question")
    d.add_argument("--max-new-tokens", type=int, default=24)
    d.add_argument("--batch", type=int, default=5, help="passages per IngestChunks call")
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument("--cache-dir", default=None)
    d.add_argument("--redis-url", default=None, help="add a Redis tier, e.g. redis://127.0.0.1:6379/0")
    d.set_defaults(func=cmd_demo)
