"""Inline documents, chat messages, sampling and stop strings, on the engine without a server (issue 20):
a passage given inline is one chunk, content-addressed per tenant, computed and stored the first time and
a cache hit the next; its id then works as a chunk id; a seeded sample is the same tokens every time."""

from __future__ import annotations

import pytest
from tests.helpers.model import CACHE_DIR
from tests.helpers.service import DOCUMENTS

from services.serving.engine import Engine
from services.serving.errors import InvalidArgument
from services.serving.generation import StopStrings
from services.serving.requests import DocumentIn, GenerateParams
from services.settings import build

MAX_DOCS, MAX_CHARS = 3, 3000


@pytest.fixture(scope="module")
def engine(service_model_dir, tmp_path_factory):
    settings = build({"server": {"chunk_tokens": 128, "max_inline_documents": MAX_DOCS,
                                 "max_inline_document_chars": MAX_CHARS}},
                     {"spec": str(service_model_dir), "cache_dir": str(CACHE_DIR),
                      "data_dir": str(tmp_path_factory.mktemp("inline-data")), "device": "cpu"})
    engine = Engine.open(settings)
    yield engine
    engine.close()


def _answer(engine, tenant="inline", **params):
    pieces = list(engine.generate(tenant, GenerateParams(**params)))
    return pieces[0].report, [t for p in pieces for t in p.token_ids], pieces[-1].finish


def _docs(*indexes):
    return tuple(DocumentIn(DOCUMENTS[i]["text"], DOCUMENTS[i]["title"]) for i in indexes)


def test_inline_documents_are_computed_once_then_blended_from_the_store_and_usable_by_id(engine):
    docs = _docs(0, 1)
    first, tokens, _ = _answer(engine, query="Where is the Seine?", documents=docs, max_new_tokens=6)
    assert [d.hit for d in first.documents] == [False, False]
    assert [d.chunks_computed for d in first.documents] == [1, 1]
    assert first.chunk_sources == ["computed", "computed"] and first.chunks_missing == 2
    again, tokens_again, _ = _answer(engine, query="Where is the Seine?", documents=docs, max_new_tokens=6)
    assert [d.hit for d in again.documents] == [True, True] and again.chunks_missing == 0
    prefix = len(engine.precompute.prefix_ids)
    assert first.cached_tokens == prefix and again.cached_tokens == prefix + again.chunk_tokens
    assert tokens_again == tokens
    ids = tuple(cid for d in first.documents for cid in d.chunk_ids)
    by_id, tokens_by_id, _ = _answer(engine, query="Where is the Seine?", chunk_ids=ids, max_new_tokens=6)
    assert by_id.chunk_ids == list(ids) and tokens_by_id == tokens


def test_an_inline_document_is_keyed_per_tenant(engine):
    docs = _docs(2)
    _answer(engine, tenant="tenant-a", query="Where did jazz grow?", documents=docs, max_new_tokens=1)
    other, _, _ = _answer(engine, tenant="tenant-b", query="Where did jazz grow?", documents=docs, max_new_tokens=1)
    assert other.documents[0].hit is False and other.documents[0].chunks_computed == 1


def test_a_document_over_the_chunk_size_is_split_as_ingest_splits_it(engine):
    text = " ".join(f"Sentence {i} says the river runs north past town {i}." for i in range(40))
    report, _, _ = _answer(engine, tenant="split", query="Which way?", documents=(DocumentIn(text, "River"),),
                           max_new_tokens=1)
    ingested = engine.ingest("split-ingest", [DocumentIn(text, "River")]).chunk_ids[0]
    assert len(ingested) > 1 and list(report.documents[0].chunk_ids) == ingested
    assert report.chunk_ids == ingested


@pytest.mark.parametrize("documents, limit", [
    (_docs(0, 1, 2, 3), "server.max_inline_documents"),
    ((DocumentIn("x" * (MAX_CHARS + 1), "Long"),), "server.max_inline_document_chars"),
])
def test_inline_documents_over_a_limit_are_refused_naming_it(engine, documents, limit):
    with pytest.raises(InvalidArgument, match=limit):
        engine.generate("inline", GenerateParams(query="q", documents=documents))


def test_inline_documents_with_chunk_ids_are_refused(engine):
    with pytest.raises(InvalidArgument, match="chunk_ids .* and documents"):
        engine.generate("inline", GenerateParams(query="q", documents=_docs(0), chunk_ids=("abc",)))


def test_a_seeded_sample_is_reproducible_and_the_seed_matters(engine):
    ask = dict(query="Name a mountain.", documents=_docs(1), max_new_tokens=12, temperature=1.0)
    answers = {seed: _answer(engine, seed=seed, **ask)[1] for seed in (1, 2, 3)}
    assert _answer(engine, seed=1, **ask)[1] == answers[1]
    assert len({tuple(tokens) for tokens in answers.values()}) > 1
    greedy = _answer(engine, query="Name a mountain.", documents=_docs(1), max_new_tokens=12)[1]
    assert _answer(engine, seed=5, **{**ask, "temperature": 0.0})[1] == greedy


@pytest.mark.parametrize("field, value", [("temperature", -0.5), ("top_p", 0.0), ("seed", -1)])
def test_bad_sampling_values_are_refused_naming_them(engine, field, value):
    with pytest.raises(InvalidArgument, match=f"{field} {value}"):
        engine.generate("inline", GenerateParams(query="q", **{field: value}))


def test_a_chat_of_one_user_message_is_the_query_s_prompt(engine):
    by_query = _answer(engine, query="Where is Everest?", documents=_docs(1), max_new_tokens=6)
    by_chat = _answer(engine, messages=(("user", "Where is Everest?"),), documents=_docs(1), max_new_tokens=6)
    assert by_chat[1] == by_query[1] and by_chat[0].prompt_tokens == by_query[0].prompt_tokens


def test_a_chat_must_end_with_a_user_message(engine):
    generation = engine.generate("inline", GenerateParams(messages=(("user", "Hi"), ("assistant", "Hello"))))
    with pytest.raises(InvalidArgument, match="end with a user message"):
        list(generation)


def test_stop_strings_end_the_text_before_them_even_across_pieces():
    stops = StopStrings(("END",))
    shown = [stops.add(piece, final=False) for piece in ("abc E", "N", "Dxyz")]
    assert "".join(text for text, _ in shown) == "abc " and shown[-1][1] is True
    assert StopStrings(("END",)).add("no stop E", final=True) == ("no stop E", False)
