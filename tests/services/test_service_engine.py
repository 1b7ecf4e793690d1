"""The engine without a server (all the logic is there): a chunk evicted from the store is computed
for the request, reported missing and written back; the guard below its KL limit keeps blend's answer."""

from __future__ import annotations

import math

import pytest
from tests.helpers.model import CACHE_DIR
from tests.helpers.service import DOCUMENTS

from blend.fusor import prefill_layers
from services.serving import generation
from services.serving.engine import Engine
from services.serving.loading import LoadEstimates
from services.serving.requests import DocumentIn, GenerateParams
from services.settings import DEFAULT_TENANT, build
from store.source import LoadStats


@pytest.fixture(scope="module")
def engine(service_model_dir, tmp_path_factory):
    settings = build({"server": {"chunk_tokens": 128}, "guard": {"fraction": 1.0, "max_kl": math.inf}},
                     {"spec": str(service_model_dir), "cache_dir": str(CACHE_DIR),
                      "data_dir": str(tmp_path_factory.mktemp("engine-data")), "device": "cpu"})
    engine = Engine.open(settings)
    yield engine
    engine.close()


def _answer(engine, **params):
    pieces = list(engine.generate(DEFAULT_TENANT, GenerateParams(**params)))
    return pieces[0].report, [t for p in pieces for t in p.token_ids], pieces[-1].finish


def test_an_evicted_chunk_is_computed_for_the_request_and_written_back(engine):
    result = engine.ingest(DEFAULT_TENANT, [DocumentIn(**d) for d in DOCUMENTS[:2]])
    ids = [chunk_ids[0] for chunk_ids in result.chunk_ids]
    first, tokens, _ = _answer(engine, query="Where?", chunk_ids=tuple(ids), mode="reuse", max_new_tokens=4)
    assert first.chunks_missing == 0 and sum(first.chunks_hit.values()) == 2
    text = engine.catalog.run(lambda: engine.catalog.existing(DEFAULT_TENANT).get(ids[1]).text)
    token_ids = engine.model.tokenizer(text, add_special_tokens=False)["input_ids"]
    engine.store.delete(engine.precompute.key(token_ids, DEFAULT_TENANT))  # as if every tier had evicted it
    again, tokens_again, _ = _answer(engine, query="Where?", chunk_ids=tuple(ids), mode="reuse",
                                     max_new_tokens=4)
    assert again.chunks_missing == 1 and again.missing_tokens == len(token_ids)
    assert again.missing_compute_s > 0 and tokens_again == tokens  # recomputed KV is the same KV
    third, _, _ = _answer(engine, query="Where?", chunk_ids=tuple(ids), mode="reuse", max_new_tokens=1)
    assert third.chunks_missing == 0 and sum(third.chunks_hit.values()) == 2  # written back


def test_below_its_kl_limit_the_guard_records_and_keeps_the_blend_answer(engine):
    ids = tuple(cid for chunk_ids in engine.ingest(DEFAULT_TENANT, [DocumentIn(**DOCUMENTS[2])]).chunk_ids
                for cid in chunk_ids)
    report, _, finish = _answer(engine, query="What music?", chunk_ids=ids, mode="blend", ratio=0.0,
                                max_new_tokens=3)
    assert report.quality.checked and not report.quality.fell_back
    assert report.quality.kl >= -1e-9  # a KL of identical distributions rounds to about -1e-16
    assert finish.tokens == 3
    assert engine.guard.summary()["checked"] >= 1


def test_every_blend_request_is_planned_by_the_loading_controller_from_measured_figures(engine):
    """The engine measured a prefill at start-up, so the first blend request already has a plan: the
    CPU tier reads faster than it recomputes, so nothing is recomputed and the ratio stays the request's."""
    ids = tuple(cid for chunk_ids in engine.ingest(DEFAULT_TENANT, [DocumentIn(**d) for d in DOCUMENTS[:3]]).chunk_ids
                for cid in chunk_ids)
    report, _, _ = _answer(engine, query="Where?", chunk_ids=ids, mode="blend", ratio=0.2, max_new_tokens=1)
    assert report.plan.planned and report.plan.recompute_chunk_ids == ()
    assert report.ratio == report.plan.ratio >= 0.2
    loading = engine.stats(DEFAULT_TENANT)["loading"]
    assert loading["enabled"] and loading["planned"] >= 1 and loading["prefill_s_per_token"] > 0


def test_when_every_chunk_loads_slower_than_it_recomputes_the_request_is_a_plain_full_prefill(engine, monkeypatch):
    """Blend at ratio 1 would still place every chunk and rank every token at the check layer; with
    nothing worth loading the server runs full prefill instead: full's answer, nothing read, and the
    report names every chunk as recomputed."""
    ids = tuple(cid for chunk_ids in engine.ingest(DEFAULT_TENANT, [DocumentIn(**d) for d in DOCUMENTS[:2]]).chunk_ids
                for cid in chunk_ids)
    _, full_tokens, _ = _answer(engine, query="Where?", chunk_ids=ids, mode="full", max_new_tokens=4)
    kept = engine.estimates
    slow = LoadEstimates(kept.n_layers)
    slow.observe_prefill(1000 * kept.n_layers, 1.0)
    slow.observe_loads(LoadStats(read_s={"cpu": 1000.0}, read_bytes={"cpu": 2 << 20}))  # ~2 KB/s
    engine.estimates = slow
    modes = []

    def recording(step, layout, config, *args, **kwargs):
        modes.append(config.mode)
        return prefill_layers(step, layout, config, *args, **kwargs)

    monkeypatch.setattr(generation, "prefill_layers", recording)
    try:
        report, tokens, _ = _answer(engine, query="Where?", chunk_ids=ids, mode="blend", ratio=0.15,
                                    max_new_tokens=4)
    finally:
        engine.estimates = kept
    assert report.plan.planned and report.plan.recompute_chunk_ids == ids
    assert "full prefill" in report.plan.reason
    assert report.chunks_hit == {} and report.ratio == 1.0 and report.tokens_recomputed == report.chunk_tokens
    assert tokens == full_tokens
    assert modes[0] == "full"  # not blend at ratio 1 (the guard may add its own full prefill after it)
