"""The KV pool (request caches as ranges of one buffer) and the decode step over it: the same tokens and
logits as each request decoding from a buffer of its own, eagerly and through the whole-step decode
graphs (captured on CUDA; their body, run eagerly, on CPU)."""

import gc

import pytest
import torch
from tests.helpers import model
from tests.helpers.model import random_layout

from blend import scattered, skinny
from blend.adapter import LlamaStep
from blend.cache import KVCache, KVPool
from blend.decode import Decoding, advance
from blend.fusor import BlendConfig, prefill
from blend.graphs import DecodeGraphs

LAYOUTS = ((1, (9, 14, 11)), (2, (4,)), (3, (20, 7)))


def _pool(step, tokens=256, block=16):
    return KVPool(step.n_layers, tokens, step.n_kv_heads, step.head_dim, step.dtype, step.device, block=block)


def test_ranges_are_taken_first_fit_and_given_back_when_the_cache_is_dropped():
    step = LlamaStep(model.tiny_model())
    pool = _pool(step, tokens=128, block=16)
    assert pool.free_tokens == 112  # the first block is scratch
    a, b = pool.take(20), pool.take(16)
    assert (a.offset, a.capacity, b.offset, b.capacity) == (16, 32, 48, 16)
    assert a.data.data_ptr() == pool.data[:, 16].data_ptr()  # a view, not a copy
    assert pool.take(100) is None and pool.misses == 1  # no range that large: the caller allocates its own
    del a
    gc.collect()
    assert pool.free_tokens == 112 - 16
    c = pool.take(32)
    assert c.offset == 16  # the freed range, first fit
    del b, c
    gc.collect()
    assert pool.free_tokens == 112 and pool.take(112).offset == 16  # neighbours merged back into one range


def test_a_range_longer_than_the_pools_longest_is_refused_and_the_bound_is_the_models_context():
    """`longest` bounds one range (a decode step's attention is told no row sees more keys: in a pool of
    250K positions a 5K-token request's decode need not be sized for 250K); a cache asked for beyond it is
    refused like one that finds no room (the caller allocates its own), and the server's bound is the
    model's context, padded as a buffer is."""
    step = LlamaStep(model.tiny_model())
    pool = KVPool(step.n_layers, 256, step.n_kv_heads, step.head_dim, step.dtype, step.device, block=16, longest=40)
    assert pool.longest == 48  # rounded up to the block
    held = pool.take(48)
    assert held.capacity == 48
    assert pool.take(49) is None and pool.misses == 1 and pool.free_tokens == 256 - 16 - 48
    assert _pool(step, tokens=128, block=16).longest == 112  # default: all but the scratch block
    assert step.longest_cache == step.cache_tokens(step.max_positions)
    with pytest.raises(ValueError, match="longest range 0"):
        KVPool(step.n_layers, 256, step.n_kv_heads, step.head_dim, step.dtype, step.device, block=16, longest=0)


def test_a_pool_smaller_than_two_blocks_is_refused_by_name():
    step = LlamaStep(model.tiny_model())
    with pytest.raises(ValueError, match="16 tokens"):
        _pool(step, tokens=16, block=16)


def test_new_cache_takes_from_the_pool_and_falls_back_to_its_own_buffer_when_full():
    step = LlamaStep(model.tiny_model())
    step.kv_pool = _pool(step, tokens=64, block=16)
    inside = step.new_cache(40)
    outside = step.new_cache(40)
    assert inside.pool is step.kv_pool and outside.pool is None and outside.capacity == 40


def _decode(step, steps=5):
    decodings = [Decoding(f.cache, f.length, f.logits)
                 for f in (prefill(step, random_layout(seed, lengths), BlendConfig("full"), None,
                                   capacity=len(random_layout(seed, lengths)) + 8) for seed, lengths in LAYOUTS)]
    for _ in range(steps):
        advance(step, decodings, [d.token() for d in decodings])
    return decodings


# The tiny model stays on the CPU: its Triton kernels run only under the interpreter (not where CUDA is).
@pytest.mark.parametrize("graphs,kernels", [(False, False), (True, False),
                                            pytest.param(True, True, marks=pytest.mark.skipif(
                                                not scattered.available(torch.device("cpu")),
                                                reason="Triton's interpreter is off where CUDA runs"))],
                         ids=["eager", "decode-graphs", "decode-graphs-kernels"])
def test_a_batched_step_over_pooled_caches_equals_each_request_in_its_own_buffer(graphs, kernels, monkeypatch):
    """Three requests of different lengths in one pool (their ranges not in batch order after a free),
    five batched steps (two through the kernels): same logits and same K/V as with buffers of their own, decoded one by one. With
    the Triton kernels (CUDA's path; here interpreted): RoPE writing K/V into the pool, the norms, the
    attention over the pool."""
    steps = 2 if kernels else 5  # interpreted kernels are slow: fewer steps through them
    own = LlamaStep(model.tiny_model())
    alone = []
    for seed, lengths in LAYOUTS:
        layout = random_layout(seed, lengths)
        f = prefill(own, layout, BlendConfig("full"), None, capacity=len(layout) + 8)
        d = Decoding(f.cache, f.length, f.logits)
        for _ in range(steps):
            advance(own, [d], [d.token()])
        alone.append(d)

    pooled = LlamaStep(model.tiny_model())
    pooled.kv_pool = _pool(pooled, tokens=512, block=16)
    hole = pooled.kv_pool.take(48)  # taken then freed below: the next requests' offsets are out of order
    if graphs:
        pooled.decode_graphs = DecodeGraphs(pooled, pooled.kv_pool, buckets=(1, 4))
    together = []
    for index, (seed, lengths) in enumerate(LAYOUTS):
        layout = random_layout(seed, lengths)
        if index == 1:
            del hole
            gc.collect()
        f = prefill(pooled, layout, BlendConfig("full"), None, capacity=len(layout) + 8)
        assert f.cache.pool is pooled.kv_pool
        together.append(Decoding(f.cache, f.length, f.logits))
    assert [d.cache.offset for d in together] != sorted(d.cache.offset for d in together)
    # The decode steps' kernels (the prefills above took PyTorch's path: interpreted kernels are slow).
    pooled.fused_kernels = pooled.pool_attention_kernel = pooled.skinny_kernel = kernels
    if kernels:  # every projection through the few-rows matmul
        monkeypatch.setattr(skinny, "FASTER", {shape: (64, 32, 2) for shape in pooled.projection_shapes()})
    for _ in range(steps):
        advance(pooled, together, [d.token() for d in together])
    for one, many in zip(alone, together):
        assert many.length == one.length
        torch.testing.assert_close(many.logits, one.logits, rtol=1e-5, atol=1e-5)
        # atol 1e-5: the pooled attention sums in another order than SDPA (float32 rounding only)
        torch.testing.assert_close(many.cache.data[:, : many.length], one.cache.data[:, : one.length],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("splits", [2, 4, 16])
def test_split_kv_attention_over_the_pool_equals_one_piece_per_row(splits):
    """Each row's keys cut into pieces merged by log-sum-exp (what CUDA runs, 8 pieces): the same logits
    as one piece per row, also for rows shorter than the number of pieces (empty pieces weigh nothing;
    a padding row of a graph bucket has one key) and through the whole-step graphs' body."""
    runs = []
    for pieces in (1, splits):
        step = LlamaStep(model.tiny_model())
        step.kv_pool, step.decode_splits = _pool(step, tokens=512, block=16), pieces
        step.decode_graphs = DecodeGraphs(step, step.kv_pool, buckets=(4,))
        runs.append(_decode(step))
    for one, split in zip(*runs):
        torch.testing.assert_close(split.logits, one.logits, rtol=1e-5, atol=1e-5)


def test_more_pieces_than_a_pool_block_are_refused_by_name():
    from blend.adapter import PooledDecode

    step = LlamaStep(model.tiny_model())
    pool = _pool(step, tokens=64, block=16)
    with pytest.raises(ValueError, match="17 splits"):
        PooledDecode.over(pool, PooledDecode.layout([], [], [], 2, pool), 2, splits=17)


def test_decode_graphs_decline_a_cache_outside_the_pool_and_a_batch_past_their_buckets():
    step = LlamaStep(model.tiny_model())
    step.kv_pool = _pool(step)
    graphs = DecodeGraphs(step, step.kv_pool, buckets=(1, 2))
    own = step.kv_pool.take(16)
    foreign = KVCache.empty(step.n_layers, 16, step.n_kv_heads, step.head_dim, step.dtype, step.device)
    assert graphs.run([1], [0], [foreign]) is None
    assert graphs.run([1, 2, 3], [0, 0, 0], [own, own, own]) is None
    assert graphs.run([1], [0], [own]).shape == (1, step.config.vocab_size)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_graphed_pooled_decode_equals_the_eager_step_over_the_pool_in_bf16():
    """bf16 tiny model on the GPU: the captured whole-step graph (FlashAttention varlen over the pool)
    against the eager pooled step and against buffers of their own (cuDNN), logits within bf16 rounding."""
    runs = []
    for mode in ("own", "eager", "graphs"):
        step = LlamaStep(model.tiny_model().to("cuda", torch.bfloat16))
        if mode != "own":
            step.kv_pool = _pool(step, tokens=1024, block=64)
        if mode == "graphs":
            step.decode_graphs = DecodeGraphs(step, step.kv_pool, buckets=(1, 4))
            step.decode_graphs.capture_all()
        runs.append(_decode(step))
    for own, eager, graphed in zip(*runs):
        torch.testing.assert_close(graphed.logits, eager.logits, rtol=0, atol=0)
        torch.testing.assert_close(eager.logits, own.logits, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("stop_at", [None, 3])
def test_one_step_ahead_through_the_decode_graphs_yields_plain_decodes_tokens(stop_at):
    """`decode` through the decode graphs feeds each step its token from the device before reading it:
    the same tokens as decoding from a buffer of its own; every step after the first fed that way; no
    step past the token limit, and one (computed for nothing) past a stop token."""
    from blend.decode import Sampling, decode

    layout = random_layout(5, (12, 9))
    own = LlamaStep(model.tiny_model())
    f = prefill(own, layout, BlendConfig("full"), None, capacity=len(layout) + 12)
    plain = list(decode(own, f.cache, f.length, f.logits, 8, set(), Sampling()))
    stop = set() if stop_at is None else {plain[stop_at]}
    expected = plain if stop_at is None else plain[:stop_at]

    step = LlamaStep(model.tiny_model())
    step.kv_pool = _pool(step, tokens=512, block=16)
    step.decode_graphs = DecodeGraphs(step, step.kv_pool, buckets=(1,))
    fed, run = [], step.decode_graphs.run
    step.decode_graphs.run = lambda tokens, ends, caches: fed.append(tokens[0]) or run(tokens, ends, caches)
    f = prefill(step, layout, BlendConfig("full"), None, capacity=len(layout) + 12)
    ahead = list(decode(step, f.cache, f.length, f.logits, 8, stop, Sampling()))
    assert ahead == expected and len(set(plain)) > 1
    assert fed[0] == plain[0] and all(token is None for token in fed[1:])
    assert len(fed) == (7 if stop_at is None else stop_at + 1)
