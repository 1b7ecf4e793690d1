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
    # The request's own recompute was measured: the next plan prices recompute at blend's cost, not full's.
    assert loading["recompute_s_per_token"] > 0


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


@pytest.fixture
def redis_engine(service_model_dir, tmp_path):
    import uuid

    from tests.helpers.kv import REDIS_URL
    from tests.helpers.service import delete_redis_prefix

    prefix = f"kvblend-engine-pull-{uuid.uuid4().hex}:"
    # A CPU tier over Redis (every put written through); the warm-up's thread waits an hour: the test runs
    # its passes itself.
    settings = build({"server": {"chunk_tokens": 128, "warmup_interval_s": 3600},
                      "store": {"disk_path": "none", "redis_url": REDIS_URL, "redis_prefix": prefix,
                                "write_through": True}},
                     {"spec": str(service_model_dir), "cache_dir": str(CACHE_DIR), "data_dir": str(tmp_path),
                      "device": "cpu"})
    engine = Engine.open(settings)
    yield engine
    engine.close()
    delete_redis_prefix(prefix)


def test_chunks_recomputed_for_their_slow_tier_are_pulled_into_the_cpu_tier_and_loaded_next_time(redis_engine):
    """Chunks only in Redis, which the controller finds slower to load than to recompute: the request
    prefills them in full and offers them to the warm-up; after one pass they sit in the CPU tier, and the
    same request loads them from there instead of recomputing them."""
    engine = redis_engine
    assert [tier.name for tier in engine.store.tiered.tiers] == ["cpu", "redis"] and engine.warmup is not None
    ids = tuple(cid for chunk_ids in engine.ingest(DEFAULT_TENANT, [DocumentIn(**d) for d in DOCUMENTS[:2]]).chunk_ids
                for cid in chunk_ids)
    n_layers = engine.model.step.n_layers
    for chunk_id in ids:
        text = engine.catalog.run(lambda cid=chunk_id: engine.catalog.existing(DEFAULT_TENANT).get(cid).text)
        token_ids = engine.model.tokenizer(text, add_special_tokens=False)["input_ids"]
        engine.store.delete_local(engine.precompute.key(token_ids, DEFAULT_TENANT), n_layers)  # in Redis only
    kept = engine.estimates
    slow = LoadEstimates(n_layers)
    slow.observe_prefill(1000 * n_layers, 1.0)
    slow.observe_loads(LoadStats(read_s={"redis": 1000.0}, read_bytes={"redis": 2 << 20}))  # ~2 KB/s
    engine.estimates = slow
    try:
        first, _, _ = _answer(engine, query="Where?", chunk_ids=ids, mode="blend", ratio=0.15, max_new_tokens=1)
        assert first.plan.recompute_chunk_ids == ids and engine.warmup.stats().queue == len(ids)
        assert engine.warmup.run_pass() > 0 and engine.warmup.stats().chunks == len(ids)
        again, _, _ = _answer(engine, query="Where?", chunk_ids=ids, mode="blend", ratio=0.15, max_new_tokens=1)
    finally:
        engine.estimates = kept
    assert again.plan.recompute_chunk_ids == () and again.chunks_hit == {"cpu": len(ids)}


def test_a_tier_below_memory_has_a_measured_read_rate_before_the_first_request(redis_engine):
    """Probed at start-up (values written, read back as a batch, deleted): the first request's plan already
    knows Redis's speed, and nothing of the probe is left in Redis."""
    import redis

    from tests.helpers.kv import REDIS_URL

    rates = redis_engine.estimates.summary().read_bytes_per_s
    assert rates.get("redis", 0) > 1e6
    prefix = redis_engine.store.tiered.tiers[-1].prefix
    assert not list(redis.Redis.from_url(REDIS_URL).scan_iter(match=f"{prefix}probe-*"))


def test_the_servers_selector_reaches_the_request_and_a_bad_one_is_refused_at_start_up(engine, tmp_path):
    """`server.selector` is the blend ranking every request runs (here `+cachedk`: check layer 1 on the
    cached K); one the fusor would refuse stops the configuration, naming the setting."""
    from dataclasses import replace

    result = engine.ingest(DEFAULT_TENANT, [DocumentIn(**d) for d in DOCUMENTS[:3]])
    ids = tuple(chunk_ids[0] for chunk_ids in result.chunk_ids)
    served = engine.config
    try:
        engine.config = replace(served, selector="qattn+sink4+nofirst+cachedk")
        config, _ = engine.blend_config(GenerateParams(query="Where?", chunk_ids=ids, mode="blend", ratio=0.5))
        assert config.selection.cached_keys
        report, tokens, finish = _answer(engine, query="Where?", chunk_ids=ids, mode="blend", ratio=0.5,
                                         max_new_tokens=2)
        assert report.tokens_recomputed > 0 and finish.tokens == len(tokens) == 2
    finally:
        engine.config = served
    with pytest.raises(ValueError, match="server.selector 'k\\+cachedk'"):
        build({"server": {"selector": "k+cachedk"}}, {"spec": "unused", "data_dir": str(tmp_path)})
