"""The per-layer graphs (blend/graphs.py LayerGraphs) wrap the step's row-wise parts on bucket-sized
buffers; their bodies run eagerly on the CPU, so here they must give what the plain step gives, in every
mode and in batched decode, with buckets small enough that every step runs padded rows (stale rows of
earlier steps among them). On CUDA the captured graphs are checked against eager (skipped without)."""

import weakref

import pytest
import torch

from blend.adapter import LlamaStep
from blend.decode import Decoding, advance
from blend.fusor import BlendConfig, MemorySource, cached_entries, compute_kv, prefill, prefill_layers
from blend.graphs import LayerGraphs
from blend.scattered import INTERPRETED as _INTERPRETED
from tests.helpers import model
from tests.helpers.model import random_layout

MODES = [BlendConfig(mode="full"), BlendConfig(mode="prefix"), BlendConfig(mode="reuse"),
         BlendConfig(mode="blend", ratio=0.3), BlendConfig(mode="blend", ratio=0.3, selector="k"),
         BlendConfig(mode="blend", ratio=0.5, gradual_layers=3)]


def _run(step, layouts, config, steps=5):
    """Prefill each layout, decode all of them together, then the first alone for one more token:
    (first-token logits, last logits, tokens)."""
    with torch.inference_mode():
        decodings, firsts = [], []
        for layout in layouts:
            prefix = compute_kv(step, layout.prefix)
            chunks = [compute_kv(step, ids, behind=prefix) for ids in layout.chunks]
            source = MemorySource(cached_entries(config.mode, prefix, chunks, layout))
            filled = prefill(step, layout, config, source if config.mode != "full" else None, len(layout) + steps + 1)
            firsts.append(filled.logits)
            decodings.append(Decoding(filled.cache, filled.length, filled.logits))
        tokens = []
        for _ in range(steps):
            picked = [d.token() for d in decodings]
            tokens.append(picked)
            advance(step, decodings, picked)
        advance(step, decodings[:1], [decodings[0].token()])  # and one request decoding alone
    return torch.stack(firsts), torch.stack([d.logits for d in decodings]), tokens


@pytest.mark.parametrize("config", MODES, ids=lambda c: c.label)
def test_layer_graph_bodies_equal_the_plain_step(config):
    plain = LlamaStep(model.tiny_model())
    graphed = LlamaStep(model.tiny_model())
    graphed.graphs = LayerGraphs(graphed, buckets=(2, 4, 16, 32))
    graphed.batched_attention = True  # the decode batch's attention in one call, as on CUDA
    for step in (plain, graphed):
        step.attention_buckets = (8, 16)  # padded attention rows too, as on CUDA
    layouts = [random_layout(seed=5), random_layout(seed=6, chunk_lengths=(7, 12))]
    want = _run(plain, layouts, config)
    got = _run(graphed, layouts, config)
    assert (got[0] - want[0]).abs().max() < 1e-5
    assert (got[1] - want[1]).abs().max() < 1e-5
    assert got[2] == want[2]
    assert set(graphed.graphs._sets) >= {2, 16}  # the decode batch and the prompt's steps ran in buckets


def test_bucket_choice():
    graphs = LayerGraphs(LlamaStep(model.tiny_model()), buckets=(1, 4, 64))
    assert [graphs.bucket(n) for n in (1, 2, 4, 5, 64, 65)] == [1, 4, 4, 64, 64, None]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("config", MODES, ids=lambda c: c.label)
def test_captured_layer_graphs_equal_eager_on_cuda(config):
    hf = model.tiny_model().to("cuda", torch.bfloat16)
    eager, graphed = LlamaStep(hf), LlamaStep(hf)
    graphed.graphs = LayerGraphs(graphed, buckets=(2, 4, 16, 32, 64))
    assert graphed.graphs.capture_all() > 0
    layouts = [random_layout(seed=5), random_layout(seed=6, chunk_lengths=(7, 12))]
    want = _run(eager, layouts, config)
    got = _run(graphed, layouts, config)
    # bf16: the same kernels on the same shapes, so equal up to split-K order (the gate's tolerance).
    scale = want[0].abs().max()
    assert (got[0] - want[0]).abs().max() <= 2e-2 * scale
    assert (got[1] - want[1]).abs().max() <= 2e-2 * scale


def _first_logits(step, layouts, config):
    with torch.inference_mode():
        out = []
        for layout in layouts:
            prefix = compute_kv(step, layout.prefix)
            chunks = [compute_kv(step, ids, behind=prefix) for ids in layout.chunks]
            source = MemorySource(cached_entries(config.mode, prefix, chunks, layout))
            filled = prefill(step, layout, config, source if config.mode != "full" else None, len(layout) + 4)
            out.append((filled.logits, filled.cache.data[:, : filled.length].clone(), filled.cache))
    return out


def _pooled_step(hf, buckets):
    from blend.cache import KVPool

    step = LlamaStep(hf)
    step.scattered_attention = True
    # Room for three requests' buffers past the scratch block: on CUDA a buffer is padded to the attention's key
    # bucket (512 positions), so a pool of the CPU's 240 positions would hold none and no step would run pooled.
    tokens = 240 if step.attention_buckets is None else 16 + 3 * step.cache_tokens(64)
    step.kv_pool = KVPool(step.n_layers, tokens, step.n_kv_heads, step.head_dim, step.dtype, step.device, block=16)
    # Keys hint 256: one piece a step on the CPU (the interpreter is slow; the split path with device bounds
    # is checked in test_scattered.py); on CUDA, two pieces for the larger buckets.
    step.graphs = LayerGraphs(step, buckets=buckets, kv_pool=step.kv_pool,
                              keys_hint=512 if step.device.type == "cuda" else 256)
    return step


POOLED_MODES = [BlendConfig(mode="reuse"), BlendConfig(mode="blend", ratio=0.3),
                BlendConfig(mode="blend", ratio=0.3, selector="qattn+sink4+nofirst+cachedk"),
                BlendConfig(mode="prefix")]


@pytest.mark.skipif(torch.cuda.is_available() or not _INTERPRETED, reason="the CPU check (interpreter)")
def test_whole_layer_bodies_over_the_kv_pool_equal_the_plain_step():
    """With a KV pool, each layer of a step in a bucket runs as one body (`LayerGraphs.whole`: KV write into
    the pool, scattered attention through device-read bounds, MLP): on the CPU the bodies run eagerly under
    Triton's interpreter and must give the plain step's logits and K/V, the requests' caches sitting at
    different offsets of the pool and the buckets padded. The served mode only (the interpreter is slow);
    on CUDA every mode, captured (below)."""
    config = POOLED_MODES[2]
    hf = model.tiny_model()
    plain, pooled = LlamaStep(hf), _pooled_step(hf, (2, 4, 16, 32, 64))
    layouts = [random_layout(seed=5, chunk_lengths=(12, 9, 10)), random_layout(seed=6, chunk_lengths=(7, 12))]
    want, got = _first_logits(plain, layouts, config), _first_logits(pooled, layouts, config)
    offsets = {cache.offset for *_, cache in got}
    assert all(cache.pool is pooled.kv_pool for *_, cache in got) and len(offsets) == 2 and min(offsets) >= 16
    for (logits, kv, _), (want_logits, want_kv, _) in zip(got, want):
        torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(kv, want_kv, rtol=1e-4, atol=1e-4)
    assert any(b.last_rows is not None for b in pooled.graphs._sets.values())  # the whole-layer path ran


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("config", POOLED_MODES, ids=lambda c: c.label)
def test_captured_whole_layer_graphs_over_the_kv_pool_equal_eager_on_cuda(config):
    hf = model.tiny_model().to("cuda", torch.bfloat16)
    eager, pooled = LlamaStep(hf), _pooled_step(hf, (2, 4, 16, 32, 64))
    assert pooled.graphs.capture_all() > 0 and all(b.whole for b in pooled.graphs._sets.values())
    layouts = [random_layout(seed=5, chunk_lengths=(20, 25, 18)), random_layout(seed=6, chunk_lengths=(7, 12))]
    want, got = _first_logits(eager, layouts, config), _first_logits(pooled, layouts, config)
    assert all(cache.pool is pooled.kv_pool for *_, cache in got)
    assert any(b.last_rows is not None for b in pooled.graphs._sets.values())  # the whole-layer graphs ran
    for (logits, _, _), (want_logits, _, _) in zip(got, want):
        assert (logits - want_logits).abs().max() <= 2e-2 * want_logits.abs().max()


def _alternating(step, layouts, config):
    """Each layout prefilled layer by layer, the requests' layers alternating (as the server may run other requests'
    layers between a prefill's slices): [(first-token logits, K/V)]."""
    with torch.inference_mode():
        runs = []
        for layout in layouts:
            prefix = compute_kv(step, layout.prefix)
            chunks = [compute_kv(step, ids, behind=prefix) for ids in layout.chunks]
            runs.append(prefill_layers(step, layout, config, MemorySource(cached_entries(config.mode, prefix, chunks,
                                                                                         layout)), len(layout) + 4))
        done = [None] * len(runs)
        while any(filled is None for filled in done):
            for index, run in enumerate(runs):
                if done[index] is None:
                    try:
                        next(run)
                    except StopIteration as stop:
                        done[index] = stop.value
        return [(filled.logits, filled.cache.data[:, : filled.length].clone()) for filled in done]


@pytest.mark.skipif(not torch.cuda.is_available() and not _INTERPRETED, reason="needs CUDA or Triton's interpreter")
def test_chained_whole_layer_outputs_survive_another_request_on_the_bucket(monkeypatch):
    """`LayerGraphs.CHAIN`: each whole layer's output is the bucket's own rows, taken back in place by the next layer;
    two requests of the same shape prefilled with their layers alternating share every bucket, so each step of one
    runs between two of the other's: the view it holds must get its rows moved out first (`_Bucket.take`), and both
    give what each gives alone on the plain step (CPU: bodies under the interpreter; CUDA: captured graphs)."""
    config = POOLED_MODES[2]
    cuda = torch.cuda.is_available()
    hf = model.tiny_model().to("cuda", torch.bfloat16) if cuda else model.tiny_model()
    plain, pooled = LlamaStep(hf), _pooled_step(hf, (2, 4, 16, 32, 64))
    if cuda:
        pooled.graphs.capture_all()
    lengths = (12, 9, 10)
    layouts = [random_layout(seed=5, chunk_lengths=lengths), random_layout(seed=6, chunk_lengths=lengths)]
    want = [(logits, kv) for logits, kv, _ in _first_logits(plain, layouts, config)]
    monkeypatch.setattr(LayerGraphs, "CHAIN", True)
    got = _alternating(pooled, layouts, config)
    assert any(b.last_rows is not None for b in pooled.graphs._sets.values())  # the whole-layer path ran
    assert sum(b.moved_out for b in pooled.graphs._sets.values()) > 0  # the other request's steps came between
    for (logits, kv), (want_logits, want_kv) in zip(got, want):
        if cuda:  # bf16: graphs against eager kernels (the gate's tolerance)
            assert (logits - want_logits).abs().max() <= 2e-2 * want_logits.abs().max()
        else:
            torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(kv, want_kv, rtol=1e-4, atol=1e-4)
    # One request alone: every later layer takes the view handed over, nothing moved out.
    before = sum(b.moved_out for b in pooled.graphs._sets.values())
    alone = _alternating(pooled, layouts[:1], config)
    assert sum(b.moved_out for b in pooled.graphs._sets.values()) == before
    if cuda:
        assert (alone[0][0] - want[0][0]).abs().max() <= 2e-2 * want[0][0].abs().max()
    else:
        torch.testing.assert_close(alone[0][0], got[0][0], rtol=0, atol=0)


def test_a_handed_over_view_keeps_its_rows_when_the_bucket_is_reused():
    """`_Bucket.take` on its own (any device): the view handed over keeps its values once another input comes, and
    passing that view back is taken in place."""
    from blend.graphs import _Bucket

    step = LlamaStep(model.tiny_model())
    b = _Bucket(step, 8)
    with torch.inference_mode():
        b.h.copy_(torch.arange(b.h.numel(), dtype=b.h.dtype).view_as(b.h))
        out = b.h[:5]
        b.held = weakref.ref(out)
        assert b.take(out) and b.held is None and b.moved_out == 0  # passed back: in place, consumed
        b.held = weakref.ref(out)
        rows = out.clone()
        other = torch.full((5, b.h.shape[1]), -1.0)
        assert not b.take(other) and b.moved_out == 1
        b.h[:5].copy_(other)
        assert torch.equal(out, rows) and out.data_ptr() != b.h.data_ptr()
        assert not b.take(other) and b.moved_out == 1  # nothing held any more
