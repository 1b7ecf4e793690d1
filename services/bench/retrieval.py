"""Retrieval recall@k on a MuSiQue-shaped file whose passages are ingested into a data folder.

For each question, the fraction of its own distinct passages with at least one chunk among the top k
chunks retrieved for the question over the whole index; averaged over questions. A passage's chunks
are found again by chunking it exactly as ingestion did (same tokenizer, same --chunk-tokens), since
chunk ids are content addresses. Prints a table and writes JSON.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from retriever.chunker import Chunker
from retriever.collection import Collection
from retriever.embedder import Embedder
from retriever.sources import Question, read_musique
from services.settings import ModelConfig

CUTOFFS = (1, 5, 10, 20)


def recall_at_k(questions: list[Question], chunker: Chunker, collection: Collection, embedder: Embedder,
                cutoffs=CUTOFFS) -> dict:
    passages_of = []
    missing = 0
    for question in questions:
        distinct = dict.fromkeys((p.title, p.text) for p in question.passages)
        chunk_sets = [{c.id for c in chunker.split(text, title)} for title, text in distinct if text.strip()]
        missing += sum(1 for ids in chunk_sets for cid in ids if cid not in collection)
        passages_of.append(chunk_sets)
    if missing:
        raise ValueError(f"{missing} chunks of the dataset's passages are not in {collection.folder} "
                         "(ingest the same file with the same --model and --chunk-tokens first)")
    started = time.perf_counter()
    queries = embedder.embed([q.question for q in questions])
    rankings = collection.index.search(queries, max(cutoffs))
    search_s = time.perf_counter() - started
    per_question = []
    for question, chunk_sets, ranking in zip(questions, passages_of, rankings):
        ranked = [cid for cid, _ in ranking]
        row = {"question": question.question, "passages": len(chunk_sets)}
        for k in cutoffs:
            top = set(ranked[:k])
            row[f"recall@{k}"] = sum(1 for ids in chunk_sets if ids & top) / len(chunk_sets)
        per_question.append(row)
    means = {f"recall@{k}": sum(r[f"recall@{k}"] for r in per_question) / len(per_question) for k in cutoffs}
    return {"questions": len(questions), "index_chunks": len(collection.index),
            "index_kind": collection.index.kind, "chunk_tokens": chunker.max_tokens, **means,
            "query_s": search_s / len(questions), "per_question": per_question}


def run_retrieval_eval(dataset: Path, data_dir: Path, model_config: ModelConfig, chunk_tokens: int = 512,
                       limit: int | None = None, json_out: Path | None = None) -> dict:
    """recall@k of `dataset`'s passages ingested in `data_dir`: prints a table, writes JSON to `json_out`."""
    from services.ingest import serving_tokenizer

    questions = read_musique(Path(dataset), limit)
    chunker = Chunker(serving_tokenizer(model_config), chunk_tokens)
    embedder = Embedder()
    collection = Collection(data_dir, embedder.dim)
    try:
        result = recall_at_k(questions, chunker, collection, embedder)
    finally:
        collection.docs.close()
    result.update(dataset=str(dataset), data_dir=str(data_dir), model=model_config.spec)
    print(f"{result['questions']} questions, {result['index_chunks']} chunks in a {result['index_kind']} "
          f"index ({result['chunk_tokens']}-token chunks)")
    print("| " + " | ".join(f"recall@{k}" for k in CUTOFFS) + " | query ms |")
    print("|" + "---|" * (len(CUTOFFS) + 1))
    figures = [f"{result[f'recall@{k}']:.3f}" for k in CUTOFFS] + [f"{result['query_s'] * 1e3:.1f}"]
    print("| " + " | ".join(figures) + " |")
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2))
    return result
