"""Batched decode on the model worker (issue 18): the active requests' decode steps run as one step,
and each request gets exactly the tokens it gets when decoded on its own; cancelling one mid-batch
leaves the others' tokens unchanged."""

from __future__ import annotations

import math
import threading

import pytest
from tests.helpers.model import CACHE_DIR
from tests.helpers.service import DOCUMENTS

from services.serving.engine import Engine
from services.serving.requests import DocumentIn, GenerateParams
from services.settings import DEFAULT_TENANT, build

QUERIES = ["Where is it?", "What music is played there, and by whom?", "When?"]


@pytest.fixture(scope="module")
def engine(service_model_dir, tmp_path_factory):
    settings = build({"server": {"chunk_tokens": 128, "max_active": 4},
                      "guard": {"fraction": 0.0, "max_kl": math.inf}},
                     {"spec": str(service_model_dir), "cache_dir": str(CACHE_DIR),
                      "data_dir": str(tmp_path_factory.mktemp("batch-data")), "device": "cpu"})
    engine = Engine.open(settings)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def chunk_ids(engine):
    result = engine.ingest(DEFAULT_TENANT, [DocumentIn(**d) for d in DOCUMENTS[:3]])
    return tuple(ids[0] for ids in result.chunk_ids)


def _together(engine, chunk_ids, batch, on_step=None) -> tuple[list[list[int]], list[int]]:
    """The three queries submitted while the model thread is held, so all three are active before the
    first decode step; returns each one's tokens and the size of every batched step."""
    sizes: list[int] = []

    def recording(jobs):
        sizes.append(len(jobs))
        more = batch(jobs)
        if on_step is not None:
            on_step(jobs, len(sizes))
        return more

    engine.worker.batch = recording if batch is not None else None
    held, gate = threading.Event(), threading.Event()
    holder = threading.Thread(target=engine.worker.call, args=(lambda: (held.set(), gate.wait(10)),))
    holder.start()
    try:
        assert held.wait(10)
        jobs = [engine.generate(DEFAULT_TENANT, GenerateParams(query=q, chunk_ids=chunk_ids, mode="reuse",
                                                               max_new_tokens=12)) for q in QUERIES]
    finally:
        gate.set()
        holder.join(10)
    answers = []
    for job in jobs:
        tokens = []
        try:
            for piece in job:
                tokens += piece.token_ids
        except Exception:  # noqa: BLE001 - the cancelled one ends with its error
            pass
        answers.append(tokens)
    return answers, sizes


def test_batched_decode_gives_each_request_the_tokens_it_gets_alone(engine, chunk_ids):
    batch = engine.worker.batch
    before = engine.stats(DEFAULT_TENANT)
    try:
        batched, sizes = _together(engine, chunk_ids, batch)
        during = engine.stats(DEFAULT_TENANT)
        alone, no_sizes = _together(engine, chunk_ids, None)
    finally:
        engine.worker.batch = batch
    assert max(sizes) == 3 and no_sizes == []  # the three decoded together, then each on its own
    # Stats count the steps and the tokens they fed: the batched steps fed sum(sizes) tokens, any other
    # step (one request left decoding) fed one.
    steps = during["decode_steps"] - before["decode_steps"]
    assert steps >= len(sizes)
    assert during["decode_step_tokens"] - before["decode_step_tokens"] == sum(sizes) + (steps - len(sizes))
    assert during["decode_step_seconds"] > before["decode_step_seconds"]  # the steps' model-thread time
    assert batched == alone
    assert all(len(tokens) >= 2 for tokens in alone)  # answers long enough to have decode steps


def test_cancelling_one_request_mid_batch_leaves_the_others_tokens_unchanged(engine, chunk_ids):
    batch = engine.worker.batch

    def cancel_second(jobs, step):
        if step == 1:
            jobs[1].cancel()

    try:
        alone, _ = _together(engine, chunk_ids, None)
        batched, sizes = _together(engine, chunk_ids, batch, cancel_second)
    finally:
        engine.worker.batch = batch
    assert sizes[0] == 3 and max(sizes[1:], default=0) <= 2  # the cancelled one left the batch
    assert batched[0] == alone[0] and batched[2] == alone[2]
    assert len(batched[1]) < len(alone[1])


def test_a_request_counts_its_whole_kv_buffer_and_stats_report_the_bound(engine, chunk_ids):
    job = engine.generate(DEFAULT_TENANT, GenerateParams(query="Where?", chunk_ids=chunk_ids, mode="reuse",
                                                         max_new_tokens=5))
    first = next(iter(job))
    list(job)
    step = engine.precompute.step
    per_token = step.n_layers * 2 * step.n_kv_heads * step.head_dim * step.dtype.itemsize  # K and V, every layer
    assert step.kv_bytes_per_token == per_token
    assert job.kv_bytes() == (first.report.prompt_tokens + 5) * per_token
    # Where attention is padded to buckets (CUDA), the buffer is too, and the bound counts what it holds.
    step.attention_buckets = (64, 512)
    try:
        assert job.kv_bytes() == -(-(first.report.prompt_tokens + 5) // 512) * 512 * per_token
    finally:
        step.attention_buckets = None
    stats = engine.stats(DEFAULT_TENANT)
    assert stats["kv_bytes_limit"] == 0 and stats["kv_bytes_active"] == 0 and stats["waiting_for_kv"] == 0
