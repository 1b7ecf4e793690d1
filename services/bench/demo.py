"""`kvblend demo`: the service end to end on the embedded model, in about two minutes on a laptop CPU.

Starts `kvblend serve` on a fresh temporary data folder, ingests the passages of the first few
questions of a MuSiQue-shaped file through IngestChunks (their KV is precomputed then), asks the
first question in blend mode over the retrieved chunks, prints the streamed answer and the request
report next to the gold answers, and stops the server (SIGTERM: it drains and exits).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path


def load_questions(path: Path, count: int) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"--dataset {str(path)!r}: no such file "
                                "(e.g. ../shared/datasets/musique_dev.json)")
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--dataset {str(path)!r} is not JSON: {err}") from None
    if not isinstance(items, list) or not items or not all(isinstance(i, dict) and i.get("ctxs")
                                                           for i in items):
        raise ValueError(f"--dataset {str(path)!r}: expected a list of "
                         "{question, answers, ctxs: [{title, text}]}")
    return items[:count]


def run_demo(args) -> int:
    from services.client import Answer, Client, format_report, musique_documents
    from services.bench.launch import start_local_server

    for name in ("questions", "top_k", "max_new_tokens", "batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    questions = load_questions(Path(args.dataset), args.questions)
    folder = Path(tempfile.mkdtemp(prefix="kvblend-demo-"))
    print(f"starting kvblend serve ({args.model}; data in {folder}) ...", flush=True)
    began = time.perf_counter()
    server = start_local_server(folder, args.model, args.cache_dir, args.redis_url)
    print(f"serving on {server.target} after {time.perf_counter() - began:.1f} s", flush=True)
    try:
        with Client(server.target) as client:
            client.wait_ready(30)
            documents = musique_documents(questions)
            print(f"ingesting {len(documents)} passages of {len(questions)} questions "
                  "(KV precomputed now) ...", flush=True)
            chunks = computed = 0
            began = time.perf_counter()
            for first in range(0, len(documents), args.batch):
                response = client.ingest(documents[first:first + args.batch])
                chunks += sum(len(d.chunk_ids) for d in response.documents)
                computed += response.kv_computed
                done = min(first + args.batch, len(documents))
                print(f"  {done}/{len(documents)} passages, {chunks} chunks, "
                      f"{time.perf_counter() - began:.0f} s", flush=True)
            question = questions[0]
            print(f"\nQ: {question['question']}\nA (blend, top {args.top_k} chunks): ", end="", flush=True)
            stream = client.generate(question["question"], top_k=args.top_k, mode="blend",
                                     max_new_tokens=args.max_new_tokens)
            answer = Answer.collect(stream, on_text=lambda text: print(text, end="", flush=True))
            gold = question.get("answers") or []
            print(f"\ngold: {' | '.join(map(str, gold if isinstance(gold, list) else [gold]))}\n")
            print(format_report(answer))
    finally:
        print("\nstopping the server (SIGTERM) ...", flush=True)
        code = server.stop()
        print(f"server exited with status {code}")
        shutil.rmtree(folder, ignore_errors=True)
    return 0 if code == 0 else 1


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
    d.set_defaults(func=run_demo)
