"""A real ingestion process killed with SIGKILL part-way, then rerun, ends with every chunk exactly once."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from retriever.chunker import Chunker
from retriever.collection import Collection
from retriever.sources import folder_documents
from services.ingest import open_kv_store
from services.settings import KV_DIR

from tests.helpers.corpus import TOPICS, write_docs

ROOT = Path(__file__).resolve().parents[2]
CHUNK_TOKENS = 64


def _rows(database: Path) -> int:
    if not database.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=1) as db:
            return db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
    except sqlite3.OperationalError:  # the job has not created the table yet
        return 0


def test_sigkilled_job_rerun_completes_with_every_chunk_exactly_once(tmp_path, tiny_model_dir, tiny_model):
    # Many small distinct documents: the job needs dozens of batches, so a kill lands part-way.
    topics = {f"{name}-{i}": f"Part {i} of the {name} notes. {text}"
              for i in range(8) for name, text in TOPICS.items()}
    docs = write_docs(tmp_path / "docs", topics)
    data = tmp_path / "data"
    command = [sys.executable, "-m", "services.commands.cli", "ingest", "--docs", str(docs),
               "--data-dir", str(data), "--model", str(tiny_model_dir),
               "--cache-dir", str(tmp_path / "cache"),
               "--chunk-tokens", str(CHUNK_TOKENS), "--batch-size", "4", "-q"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    chunker = Chunker(tiny_model.tokenizer, CHUNK_TOKENS)
    expected = {c.id for d in folder_documents(docs, print) for c in chunker.split(d.text, d.title, d.doc_id)}

    job = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _rows(data / "chunks.sqlite") < 8 and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)
    _, err = job.communicate()
    assert job.returncode == -signal.SIGKILL, f"the job ended before it was killed: {err.decode()[-2000:]}"
    done_when_killed = _rows(data / "chunks.sqlite")
    assert 8 <= done_when_killed < len(expected)

    rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{done_when_killed} already ingested" in rerun.stdout

    collection = Collection(data, 384)
    ids = collection.docs.ids()
    index_ids = collection.index.chunk_ids()
    assert sorted(ids) == sorted(expected)  # primary key: each at most once; all of them present
    assert sorted(index_ids) == sorted(expected)  # and each vector exactly once
    kv_store = open_kv_store(data)
    keys = [key for cid in ids for key in collection.kv_keys(cid)]
    assert len(keys) == len(ids) and all(kv_store.has(key) for key in keys)
    manifests = [p for p in (data / KV_DIR).rglob("*:m")]
    assert len(manifests) == len(ids)  # no KV entry left over for a chunk that is not recorded
    collection.docs.close()
