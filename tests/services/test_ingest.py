"""Facts about the ingestion job on a tiny random Llama: no-op re-ingest, delete, skips, resume."""

import io
import json

import pytest
import torch

from blend.fusor import compute_kv
from blend.prompt import build_layout
from retriever.chunker import Chunker
from retriever.collection import Collection
from retriever.sources import folder_documents, jsonl_documents, musique_documents, read_musique
from services.commands.cli import main
from services.ingest import delete_chunks, ingest, open_kv_store
from services.precompute import Precompute
from store.keys import chunk_key

from tests.helpers.corpus import TOPICS, write_docs, write_musique

CHUNK_TOKENS = 40


@pytest.fixture(scope="module")
def kv(tiny_model):
    return Precompute(tiny_model.step, tiny_model.tokenizer, tiny_model.fingerprint)


def _run(data_dir, documents, tiny_model, embedder, kv, kv_store=None, **options):
    collection = Collection(data_dir, embedder.dim)
    kv_store = kv_store or (open_kv_store(data_dir) if kv is not None else None)
    try:
        return ingest(documents, Chunker(tiny_model.tokenizer, CHUNK_TOKENS), collection, embedder,
                      kv, kv_store, progress=False, **options)
    finally:
        collection.close()


def _state(data_dir):
    """Rows, index ids and KV entry files of a data folder, as sets."""
    collection = Collection(data_dir, 384)
    rows = {cid: collection.kv_keys(cid) for cid in collection.docs.ids()}
    index_ids = collection.index.chunk_ids()
    collection.docs.close()
    files = {p.name: p.stat().st_mtime_ns for p in (data_dir / "kv").rglob("*") if p.is_file()}
    return rows, index_ids, files


def _silent(message):
    raise AssertionError(f"unexpected skip: {message}")


def test_stored_kv_is_the_fusor_kv_of_the_chunk_text_tokenized_on_its_own(tmp_path, tiny_model, embedder, kv):
    docs = write_docs(tmp_path / "docs")
    stats = _run(tmp_path / "data", folder_documents(docs, _silent), tiny_model, embedder, kv)
    assert stats.added == stats.kv_computed == stats.chunks > len(TOPICS)
    collection = Collection(tmp_path / "data", embedder.dim)
    store = open_kv_store(tmp_path / "data")
    prefix_ids = build_layout(tiny_model.tokenizer, [], "x").prefix
    prefix = compute_kv(tiny_model.step, prefix_ids)
    for cid in collection.docs.ids()[:3]:
        text = collection.get(cid).text
        ids = tiny_model.tokenizer(text, add_special_tokens=False)["input_ids"]
        key = chunk_key(tiny_model.fingerprint, prefix_ids, ids, torch.float32)
        assert collection.kv_keys(cid) == [key]
        stored = store.chunks.get(key)
        expected = compute_kv(tiny_model.step, ids, behind=prefix)
        assert stored.token_ids == tuple(ids) and stored.start == len(prefix_ids)
        assert torch.equal(stored.kv, expected.kv)
    collection.docs.close()


def test_reingesting_the_same_text_is_a_no_op(tmp_path, tiny_model, embedder, kv):
    docs = write_docs(tmp_path / "docs")
    first = _run(tmp_path / "data", folder_documents(docs, _silent), tiny_model, embedder, kv)
    before = _state(tmp_path / "data")
    again = _run(tmp_path / "data", folder_documents(docs, _silent), tiny_model, embedder, kv)
    assert (again.added, again.kv_computed, again.skipped) == (0, 0, first.chunks)
    assert _state(tmp_path / "data") == before  # no row, vector or KV file rewritten


def test_musique_passages_repeated_across_questions_are_ingested_once(tmp_path, tiny_model, embedder):
    dataset = write_musique(tmp_path / "m.json")
    documents = list(musique_documents(dataset, _silent))
    assert [d.title for d in documents] == ["Thames", "Jazz", "Everest"]
    stats = _run(tmp_path / "data", documents, tiny_model, embedder, None)
    assert stats.documents == 3 and stats.added == stats.chunks


def test_delete_removes_text_vector_and_every_kv_entry(tmp_path, tiny_model, embedder, kv):
    docs = write_docs(tmp_path / "docs")
    _run(tmp_path / "data", folder_documents(docs, _silent), tiny_model, embedder, kv)
    rows, _, files = _state(tmp_path / "data")
    victim, (key,) = next(iter(rows.items()))
    assert any(name.startswith(key) for name in files)

    collection = Collection(tmp_path / "data", embedder.dim)
    with pytest.raises(ValueError, match="unknown chunk id '0123456789abcdef'"):
        delete_chunks(collection, open_kv_store(tmp_path / "data").delete_chunk, [victim, "0123456789abcdef"])
    assert victim in collection  # nothing deleted on a bad request
    removed = delete_chunks(collection, open_kv_store(tmp_path / "data").delete_chunk, [victim])
    collection.close()

    assert removed == {victim: 1}
    rows_after, index_after, files_after = _state(tmp_path / "data")
    assert set(rows_after) == set(rows) - {victim} and set(index_after) == set(rows_after)
    assert not any(name.startswith(key) for name in files_after)
    assert len(files_after) == len(files) - (1 + tiny_model.step.n_layers)  # manifest + one entry per layer
    assert all(open_kv_store(tmp_path / "data").has(k) for keys in rows_after.values() for k in keys)


def test_empty_binary_and_non_utf8_files_are_skipped_by_name_and_nothing_is_lost(tmp_path, tiny_model,
                                                                                 embedder, kv):
    data = tmp_path / "data"
    _run(data, folder_documents(write_docs(tmp_path / "good"), _silent), tiny_model, embedder, kv)
    earlier, _, _ = _state(data)
    bad = tmp_path / "bad"
    write_docs(bad, {"fresh": "A new and valid document about lighthouses on rocky coasts."})
    (bad / "empty.txt").write_bytes(b"")
    (bad / "blank.md").write_text("  \n\n ")
    (bad / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (bad / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (bad / "picture.png").write_bytes(b"\x00\x01")  # not .txt/.md: not a document at all
    messages = []
    stats = _run(data, folder_documents(bad, messages.append), tiny_model, embedder, kv)

    assert stats.documents == 1 and stats.added >= 1
    text = "\n".join(messages)
    assert len(messages) == 4, text
    for name, why in [("empty.txt", "empty file"), ("blank.md", "empty file"), ("binary.txt", "binary file"),
                      ("latin1.txt", "not UTF-8")]:
        assert f"{bad / name}: {why}" in text
    after, _, _ = _state(data)
    assert set(earlier) < set(after) and all(after[cid] == keys for cid, keys in earlier.items())


def test_jsonl_lines_that_are_not_documents_are_skipped_with_their_line_number():
    lines = [b'{"text": "one", "title": "T", "id": "a"}\n', b"not json\n", b'{"title": "no text"}\n',
             b"\xff\xfe\n", b"\n", json.dumps({"text": "two"}).encode()]
    messages = []
    documents = list(jsonl_documents(io.BytesIO(b"".join(lines)), messages.append))
    assert [(d.doc_id, d.title, d.text) for d in documents] == [("a", "T", "one"), ("stdin:6", "", "two")]
    assert [m.split(":")[0] for m in messages] == ["skipped stdin line 2", "skipped stdin line 3",
                                                   "skipped stdin line 4"]


class _FailingStore:
    """The real store, until the n-th put: a crash in the middle of a batch."""

    def __init__(self, inner, fail_at):
        self.inner, self.fail_at, self.puts = inner, fail_at, 0

    def has(self, key):
        return self.inner.has(key)

    def put_chunk(self, key, entry):
        self.puts += 1
        if self.puts == self.fail_at:
            raise OSError("disk went away")
        self.inner.put_chunk(key, entry)

    def delete_chunk(self, key):
        self.inner.delete_chunk(key)


def test_a_job_failing_mid_batch_resumes_reusing_kv_already_written(tmp_path, tiny_model, embedder, kv):
    docs = write_docs(tmp_path / "docs", repeat=3)
    data = tmp_path / "data"
    failing = _FailingStore(open_kv_store(data), fail_at=7)
    with pytest.raises(OSError, match="disk went away"):
        _run(data, folder_documents(docs, _silent), tiny_model, embedder, kv, failing, batch_size=4)
    rows, _, _ = _state(data)
    assert len(rows) == 4  # only the first batch is recorded complete; 2 more KV entries are on disk
    resumed = _run(data, folder_documents(docs, _silent), tiny_model, embedder, kv, batch_size=4)
    assert resumed.skipped == 4 and resumed.kv_computed == resumed.chunks - 4 - 2
    rows, index_ids, files = _state(data)
    assert len(rows) == resumed.chunks and sorted(index_ids) == sorted(rows)
    assert len([f for f in files if f.endswith(":m")]) == len(rows)


def test_text_only_ingest_then_kv_ingest_adds_kv_without_re_embedding(tmp_path, tiny_model, embedder, kv):
    docs = write_docs(tmp_path / "docs")
    text_only = _run(tmp_path / "data", folder_documents(docs, _silent), tiny_model, embedder, None)
    assert text_only.kv_computed == 0 and not (tmp_path / "data" / "kv").exists()
    with_kv = _run(tmp_path / "data", folder_documents(docs, _silent), tiny_model, embedder, kv)
    assert (with_kv.added, with_kv.kv_computed) == (0, text_only.chunks)
    rows, _, _ = _state(tmp_path / "data")
    assert all(len(keys) == 1 for keys in rows.values())


def test_limit_stops_after_that_many_documents(tmp_path, tiny_model, embedder):
    stats = _run(tmp_path / "data", folder_documents(write_docs(tmp_path / "docs"), _silent), tiny_model,
                 embedder, None, limit=2)
    assert stats.documents == 2


def test_cli_refuses_a_tiny_chunk_size_before_loading_anything(tmp_path, capsys):
    code = main(["ingest", "--docs", str(write_docs(tmp_path / "docs")), "--data-dir", str(tmp_path / "d"),
                 "--chunk-tokens", "8"])
    assert code == 2
    assert "chunk size 8 tokens is below the minimum of 16" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_cli_ingest_retrieve_delete(tmp_path, tiny_model_dir, capsys):
    data = ["--data-dir", str(tmp_path / "data")]
    model = ["--model", str(tiny_model_dir), "--cache-dir", str(tmp_path / "cache")]
    assert main(["ingest", "--docs", str(write_docs(tmp_path / "docs")), "-q", "--json",
                 str(tmp_path / "stats.json"), *data, *model]) == 0
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["added"] == stats["kv_computed"] > 0
    capsys.readouterr()
    assert main(["retrieve", "--query", "Who climbed Everest first?", "-k", "2", *data]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].split()[2] == "Everest"
    victim = lines[0].split()[0]
    assert main(["delete", victim, *data]) == 0
    assert f"deleted {victim}" in capsys.readouterr().out
    assert main(["delete", victim, *data]) == 2
    assert f"unknown chunk id '{victim}'" in capsys.readouterr().err


def test_recall_counts_a_passage_found_when_any_of_its_chunks_is_retrieved(tmp_path, tiny_model, embedder):
    from services.bench.retrieval import recall_at_k

    questions = read_musique(write_musique(tmp_path / "m.json"))
    chunker = Chunker(tiny_model.tokenizer, CHUNK_TOKENS)
    collection = Collection(tmp_path / "data", embedder.dim)
    with pytest.raises(ValueError, match="not in .* \\(ingest the same file"):
        recall_at_k(questions, chunker, collection, embedder)
    ingest(musique_documents(tmp_path / "m.json", _silent), chunker, collection, embedder, progress=False)
    result = recall_at_k(questions, chunker, collection, embedder, cutoffs=(1, len(collection)))
    assert result["questions"] == 2 and [r["passages"] for r in result["per_question"]] == [2, 2]
    assert result[f"recall@{len(collection)}"] == 1.0  # everything retrieved: every passage found
    assert result["recall@1"] == 0.5  # one chunk retrieved: at most one of two passages
    collection.close()


def test_chunk_keys_are_remembered_per_tenant_and_equal_the_content_address(kv, monkeypatch):
    from services import precompute
    from store import keys

    hashed = []
    monkeypatch.setattr(precompute, "chunk_key", lambda *a: hashed.append(a) or keys.chunk_key(*a))
    monkeypatch.setattr(precompute, "KEY_CACHE", 2)
    monkeypatch.setattr(kv, "_keys", type(kv._keys)())
    ids = [5, 6, 7]
    first = kv.key(ids)
    assert first == keys.chunk_key(kv.fingerprint, kv.prefix_ids, ids, kv.step.dtype)
    assert kv.key(tuple(ids)) == first and len(hashed) == 1  # remembered
    other = kv.key(ids, tenant="acme")
    assert other != first and len(hashed) == 2  # a tenant's key is its own
    kv.key([8])  # a third key in a cache of two: the least recently used (the default tenant's) goes
    assert kv.key(ids, tenant="acme") == other and len(hashed) == 3
    assert kv.key(ids) == first and len(hashed) == 4  # recomputed after eviction, the same address


def test_a_chunks_key_is_its_content_address_whether_its_ids_come_packed_or_not(kv, tiny_model):
    """`Precompute.key` remembers keys by the ids' int64 bytes: a served chunk's `TokenIds`, a plain tuple and a list
    of the same ids get the one address `chunk_key` gives (remembered or not); a tenant's differs; other ids differ."""
    from blend.prompt import TokenIds

    ids = tuple(range(100, 140))
    expected = chunk_key(tiny_model.fingerprint, kv.prefix_ids, ids, tiny_model.step.dtype)
    kv._keys.clear()
    assert kv.key(TokenIds(ids)) == expected  # hashed, then remembered
    assert kv.key(ids) == kv.key(list(ids)) == kv.key(TokenIds(ids)) == expected  # remembered
    assert kv.key(ids, "acme") != expected and kv.key(ids[:-1]) != expected
