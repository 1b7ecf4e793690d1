"""`kvblend demo`: the service end to end on the embedded model, in about two minutes on a laptop CPU.

Starts `kvblend serve` on a fresh temporary data folder, ingests the passages of the first few
questions of a MuSiQue-shaped file through IngestChunks (their KV is precomputed then), asks the
first question in blend mode over the retrieved chunks, prints the streamed answer and the request
report next to the gold answers, and stops the server (SIGTERM: it drains and exits).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class DemoConfig:
    dataset: Path  # MuSiQue-shaped JSON
    questions: int = 2  # questions whose passages are ingested
    top_k: int = 4  # chunks retrieved for the question
    max_new_tokens: int = 24
    batch: int = 5  # passages per IngestChunks call
    model: str = "smollm2-135m"
    cache_dir: str | None = None
    redis_url: str | None = None  # adds a Redis tier

    def __post_init__(self):
        for name in ("questions", "top_k", "max_new_tokens", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)} must be >= 1")


def run_demo(config: DemoConfig) -> int:
    from retriever.sources import question_documents, read_musique
    from services.client import Answer, Client, format_report
    from services.bench.launch import start_local_server

    questions = read_musique(Path(config.dataset), config.questions)
    folder = Path(tempfile.mkdtemp(prefix="kvblend-demo-"))
    print(f"starting kvblend serve ({config.model}; data in {folder}) ...", flush=True)
    began = time.perf_counter()
    server = start_local_server(folder, config.model, config.cache_dir, config.redis_url)
    print(f"serving on {server.target} after {time.perf_counter() - began:.1f} s", flush=True)
    try:
        with Client(server.target) as client:
            client.wait_ready(30)
            documents = [asdict(d) for d in question_documents(questions, Path(config.dataset).name)]
            print(f"ingesting {len(documents)} passages of {len(questions)} questions "
                  "(KV precomputed now) ...", flush=True)
            chunks = computed = 0
            began = time.perf_counter()
            for first in range(0, len(documents), config.batch):
                response = client.ingest(documents[first:first + config.batch])
                chunks += sum(len(d.chunk_ids) for d in response.documents)
                computed += response.kv_computed
                done = min(first + config.batch, len(documents))
                print(f"  {done}/{len(documents)} passages, {chunks} chunks, "
                      f"{time.perf_counter() - began:.0f} s", flush=True)
            question = questions[0]
            print(f"\nQ: {question.question}\nA (blend, top {config.top_k} chunks): ", end="", flush=True)
            stream = client.generate(question.question, top_k=config.top_k, mode="blend",
                                     max_new_tokens=config.max_new_tokens)
            answer = Answer.collect(stream, on_text=lambda text: print(text, end="", flush=True))
            print(f"\ngold: {' | '.join(question.answers)}\n")
            print(format_report(answer))
    finally:
        print("\nstopping the server (SIGTERM) ...", flush=True)
        code = server.stop()
        print(f"server exited with status {code}")
        shutil.rmtree(folder, ignore_errors=True)
    return 0 if code == 0 else 1
