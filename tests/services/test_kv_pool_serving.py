"""The KV pool on the served path (on CUDA the engine opens one; here a CPU engine is given one): an
answer decoded from pooled buffers is the answer decoded from buffers of their own, and a request's
range goes back to the pool when its answer ends, without waiting for the garbage collector."""

from __future__ import annotations

import gc

import pytest
from tests.helpers.model import CACHE_DIR
from tests.helpers.service import DOCUMENTS

from blend.cache import KVPool
from blend.graphs import DecodeGraphs
from services.serving.engine import Engine
from services.serving.requests import DocumentIn, GenerateParams
from services.settings import DEFAULT_TENANT, build


@pytest.fixture(scope="module")
def engine(service_model_dir, tmp_path_factory):
    settings = build({"server": {"chunk_tokens": 128, "max_active": 4}},
                     {"spec": str(service_model_dir), "cache_dir": str(CACHE_DIR),
                      "data_dir": str(tmp_path_factory.mktemp("pool-data")), "device": "cpu"})
    engine = Engine.open(settings)
    yield engine
    engine.close()


def _tokens(engine, ids, query):
    pieces = list(engine.generate(DEFAULT_TENANT, GenerateParams(query=query, chunk_ids=tuple(ids), mode="blend",
                                                                 max_new_tokens=6)))
    return [t for p in pieces for t in p.token_ids]


def test_pooled_answers_equal_own_buffer_answers_and_ranges_go_back_when_answers_end(engine):
    result = engine.ingest(DEFAULT_TENANT, [DocumentIn(**d) for d in DOCUMENTS[:3]])
    ids = [chunk_ids[0] for chunk_ids in result.chunk_ids]
    queries = ["Where is the Seine?", "How high is Everest?"]
    own = [_tokens(engine, ids, q) for q in queries]
    step = engine.model.step
    pool = KVPool(step.n_layers, 4096, step.n_kv_heads, step.head_dim, step.dtype, step.device, block=64)
    step.kv_pool, step.decode_graphs = pool, DecodeGraphs(step, pool, buckets=(1, 2))
    taken, take = [], pool.take  # whether each buffer asked for was a range of the pool (no reference kept)

    def recording(capacity):
        cache = take(capacity)
        taken.append(cache is not None)
        return cache
    pool.take = recording
    try:
        stats = engine.stats(DEFAULT_TENANT)
        assert stats["kv_pool_bytes"] == 4096 * step.kv_bytes_per_token and stats["kv_pool_misses"] == 0
        assert stats["device_memory_bytes"] == stats["device_memory_peak_bytes"] == 0  # a CPU engine
        gc.disable()  # a range must come back when the answer ends, not at a collection
        try:
            pooled = [_tokens(engine, ids, q) for q in queries]
            assert pool.free_tokens == 4096 - 64
            assert engine.stats(DEFAULT_TENANT)["kv_pool_free_bytes"] == (4096 - 64) * step.kv_bytes_per_token
        finally:
            gc.enable()
    finally:
        step.kv_pool, step.decode_graphs = None, None
    assert taken and all(taken)
    assert pooled == own and all(len(answer) == 6 for answer in own)


def test_an_answer_cut_by_a_stop_string_one_step_ahead_ends_where_it_ends_alone_and_gives_its_range_back(engine):
    """Through the decode graphs the server runs one step ahead: the step after the token that completes a stop
    string is already computed when the host sees it. The answer still ends at the same text as decoding from
    a buffer of its own, and its range (with that step's K/V in it) goes back to the pool."""
    result = engine.ingest(DEFAULT_TENANT, [DocumentIn(**d) for d in DOCUMENTS[:2]])
    ids = tuple(chunk_ids[0] for chunk_ids in result.chunk_ids)

    def answer(stop=()):
        pieces = list(engine.generate(DEFAULT_TENANT, GenerateParams(query="Where is the Seine?", chunk_ids=ids,
                                                                     mode="blend", max_new_tokens=8, stop=stop)))
        return "".join(p.text for p in pieces), pieces[-1].finish

    full_text, _ = answer()
    cut = full_text[len(full_text) // 2 :][:3]  # a stop string from the answer's second half
    assert cut.strip(), full_text
    alone, alone_finish = answer((cut,))
    step = engine.model.step
    pool = KVPool(step.n_layers, 4096, step.n_kv_heads, step.head_dim, step.dtype, step.device, block=64)
    step.kv_pool, step.decode_graphs = pool, DecodeGraphs(step, pool, buckets=(1, 2))
    fed = []
    run = step.decode_graphs.run
    step.decode_graphs.run = lambda tokens, ends, caches: fed.extend(tokens) or run(tokens, ends, caches)
    gc.disable()
    try:
        ahead, ahead_finish = answer((cut,))
        assert pool.free_tokens == 4096 - 64
    finally:
        gc.enable()
        step.kv_pool, step.decode_graphs = None, None
    assert ahead == alone and ahead_finish.reason == alone_finish.reason == "stop"
    assert None in fed  # steps were fed from the device
