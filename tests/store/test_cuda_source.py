"""GPU-only facts of the request path's KV source (skipped without CUDA; run on the lent H200): from
every tier it delivers exactly the bytes the store holds, blend from it equals blend from memory,
and with chunk KV in the pinned CPU tier no layer's compute waits for its copy."""

import gc

import pytest
import torch

from blend import fusor
from blend.adapter import LlamaStep
from blend.fusor import BlendConfig, MemorySource, compute_kv, prefill
from store.chunks import ChunkStore
from store.disk_tier import DiskTier
from store.keys import chunk_key, layer_key
from store.memory_tier import MemoryTier
from store.source import StoreSource
from store.tiered import TieredStore
from tests.helpers.kv import REDIS_URL
from tests.helpers.model import random_layout, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def cuda_step():
    return LlamaStep(tiny_model().to("cuda"))


def _tier(name: str, tmp_path):
    if name == "redis":
        import redis

        from store.redis_tier import RedisTier

        try:
            redis.Redis.from_url(REDIS_URL).ping()
        except redis.ConnectionError:
            pytest.skip(f"no Redis at {REDIS_URL}")
        return RedisTier(REDIS_URL, f"kvblend-cuda-test-{tmp_path.name}:")
    if name == "disk":
        return DiskTier(tmp_path / "disk")
    return MemoryTier(name, "cuda" if name == "gpu" else "cpu")


def _entries(step, seed=11, lengths=(30, 25, 40)):
    layout = random_layout(seed=seed, chunk_lengths=lengths)
    with torch.inference_mode():
        prefix = compute_kv(step, layout.prefix)
        chunks = [compute_kv(step, ids, behind=prefix) for ids in layout.chunks]
    return layout, prefix, chunks


def _store(tier, chunks):
    store = ChunkStore(TieredStore([tier], [None]))
    keys = [chunk_key("fp", (), c.token_ids, c.kv.dtype) for c in chunks]
    for key, chunk in zip(keys, chunks):
        store.put(key, chunk)
    return store, keys


@pytest.mark.parametrize("tier", ["gpu", "cpu", "disk", "redis"])
def test_source_delivers_exactly_the_bytes_the_store_holds_from_every_tier(cuda_step, tier, tmp_path):
    layout, prefix, chunks = _entries(cuda_step)
    store, keys = _store(_tier(tier, tmp_path), chunks)
    if tier == "cpu":
        assert store.tiered.tiers[0].pin  # the CPU tier holds pinned memory on a CUDA machine
    source = StoreSource(store, [prefix, *keys], device="cuda").begin()
    assert source.stats.tiers == ["memory"] + [tier] * len(chunks)
    for layer in range(source.n_layers):
        blocks = source.layer(layer)
        held = [prefix.kv[layer]] + [store.tiered.get(layer_key(key, layer)) for key in keys]
        for block, expected in zip(blocks, held):
            assert block.is_cuda and torch.equal(block, expected.to("cuda"))
    stats = source.finish()
    assert stats.computed == {}
    if tier in ("cpu", "disk", "redis"):
        assert stats.copy_bytes == sum(c.kv.numel() * c.kv.element_size() for c in chunks)
    else:
        assert stats.copy_bytes == 0  # GPU-tier entries are handed over in place


@pytest.mark.parametrize("ratio", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("tier", ["gpu", "cpu", "disk"])
def test_blend_from_the_store_source_equals_blend_from_memory(cuda_step, tier, ratio, tmp_path):
    layout, prefix, chunks = _entries(cuda_step)
    store, keys = _store(_tier(tier, tmp_path), chunks)
    config = BlendConfig(mode="blend", ratio=ratio)
    with torch.inference_mode():
        expected = prefill(cuda_step, layout, config, MemorySource([prefix, *chunks])).logits
        got = prefill(cuda_step, layout, config, StoreSource(store, [prefix, *keys], device="cuda").begin()).logits
    assert torch.equal(got, expected)


def test_with_chunk_kv_in_the_cpu_tier_no_layer_waits_for_its_copy():
    """Llama-3-8B layers (bf16, 8 of them), 10 chunks of 512 tokens: one layer's copy (21 MB) hides
    behind the previous layer's compute."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=8,
                                  num_attention_heads=32, num_key_value_heads=8, vocab_size=1000,
                                  max_position_embeddings=8192)
    with torch.device("cuda"):
        step = LlamaStep(AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval())
    layout, prefix, chunks = _entries(step, seed=3, lengths=(512,) * 10)
    store, keys = _store(MemoryTier("cpu"), chunks)
    with torch.inference_mode():
        for _ in range(2):  # the first request warms the kernels and the pinned allocator
            source = StoreSource(store, [prefix, *keys], device="cuda", timeline=True).begin()
            prefill(step, layout, BlendConfig(mode="blend", ratio=0.15), source)
            stats = source.finish()
    print("timeline ms:", source.timeline_ms()[:4], "stall ms:", 1000 * stats.stall_s)
    # Layers 0 and 1 are copied before any compute can hide them; every later one must not wait.
    stalls = [row for row in source.timeline_ms()[2:] if row["compute_start"] - row["asked"] > 0.05]
    assert not stalls, f"layers waited for their copy: {stalls}"


def test_into_copies_host_chunks_and_places_the_prefix_straight_into_the_request_buffer(cuda_step, tmp_path):
    layout, prefix, chunks = _entries(cuda_step)
    store, keys = _store(_tier("cpu", tmp_path), chunks)
    cache = cuda_step.new_cache(len(layout) + 8)
    starts = [0] + layout.chunk_starts()
    source = StoreSource(store, [prefix, *keys], device="cuda").begin()
    assert source.into(cache.data, starts) == set(range(1 + len(keys)))  # the fusor places none of them
    torch.cuda.current_stream().synchronize()
    assert torch.equal(cache.data[:, : len(prefix)], prefix.kv)  # the prefix, every layer at once
    for layer in range(source.n_layers):
        blocks = source.layer(layer)
        assert blocks[0].data_ptr() == prefix.kv[layer].data_ptr()  # in memory on the GPU: handed over as is
        for block, start, chunk in zip(blocks[1:], starts[1:], chunks):
            assert block.data_ptr() == cache.data[layer, start].data_ptr()  # a view of the buffer, no staging
            torch.cuda.current_stream().synchronize()
            assert torch.equal(cache.data[layer, start : start + len(chunk)], chunk.kv[layer].to("cuda"))
    assert source.finish().copy_bytes == sum(c.kv.numel() * c.kv.element_size() for c in chunks)


@pytest.mark.parametrize("ratio", [0.15, 0.5])
def test_the_served_path_equals_it_without_the_twelfth_sessions_kernels_and_raw_copies(cuda_step, ratio, monkeypatch):
    """The served selector from the pinned CPU tier: with raw copies (store.dma), the re-rotation from positions and
    the question-mass kernels against PyTorch's copies, the re-rotation by tables and the PyTorch ranking: the same
    recomputed tokens, the same caches (bf16-free: the tiny model is float32) and logits within rounding."""
    from services.settings import SERVED_SELECTOR
    from store import dma

    layout, prefix, chunks = _entries(cuda_step, seed=5, lengths=(60, 45, 70, 52))
    store, keys = _store(MemoryTier("cpu"), chunks)
    config = BlendConfig(mode="blend", ratio=ratio, selector=SERVED_SELECTOR)
    with torch.inference_mode():
        served = prefill(cuda_step, layout, config, StoreSource(store, [prefix, *keys], device="cuda").begin())
        with monkeypatch.context() as patch:
            patch.setattr(dma, "copy_async", lambda targets, sources, stream: list(range(len(targets))))
            patch.setattr(StoreSource, "PLAN_LAYERS", 0)  # (the copy plan's copies are raw ones too)
            patch.setattr(cuda_step, "question_kernel", False)
            patch.setattr(cuda_step, "rerotate_kernel", False)
            plain = prefill(cuda_step, layout, config, StoreSource(store, [prefix, *keys], device="cuda").begin())
    assert dma.available() and served.recomputed == plain.recomputed > 0
    torch.testing.assert_close(served.logits, plain.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(served.cache.data[:, : plain.length], plain.cache.data[:, : plain.length],
                               rtol=1e-4, atol=1e-4)


def test_a_served_source_tops_the_copy_stream_up_and_neither_waits_nor_marks_for_a_copy_already_done(cuda_step):
    """Without `timeline`, a layer whose copy is known done is handed over with no wait on the compute stream and no
    stall marks; each `ahead` call issues only what tops the copy stream up to IN_FLIGHT layers not yet copied;
    the request's figures (bytes, GPU copy time, no stall) and the bytes delivered stay what they were."""
    deep = LlamaStep(tiny_model(num_hidden_layers=16).to("cuda"))  # enough layers for AHEAD to bind
    layout, prefix, chunks = _entries(deep, seed=7)
    store, keys = _store(MemoryTier("cpu"), chunks)
    cache = deep.new_cache(len(layout) + 8)
    starts = [0] + layout.chunk_starts()
    source = StoreSource(store, [prefix, *keys], device="cuda").begin()
    source.into(cache.data, starts)
    assert source._issued == StoreSource.ISSUE_FIRST - 1
    expected_issued = source._issued
    for layer in range(source.n_layers):
        torch.cuda.synchronize()  # every copy issued so far is done
        source.layer(layer)
        expected_issued = max(expected_issued, layer)
        assert source._issued == expected_issued  # the asked layer only: later ones wait for `ahead`
        source.ahead()  # (the fusor's call once the layer's compute is enqueued)
        expected_issued = min(expected_issued + StoreSource.IN_FLIGHT, layer + StoreSource.AHEAD, source.n_layers - 1)
        assert source._issued == expected_issued
    assert all(mark is None for mark in source._marks["asked"] + source._marks["compute_start"])
    stats = source.finish()
    assert stats.stall_s == 0 and stats.stalled_layers == 0 and stats.copy_s > 0
    # One event read per run of layers issued back to back: the per-layer spans' sum, up to the events' resolution.
    per_layer = sum(start.elapsed_time(end) for start, end in source._spans("copy_start", "copy_end")) / 1000
    assert stats.copy_s == pytest.approx(per_layer, abs=2e-6 * source.n_layers)
    assert stats.copy_bytes == sum(c.kv.numel() * c.kv.element_size() for c in chunks)
    for start, chunk in zip(starts[1:], chunks):
        assert torch.equal(cache.data[:, start : start + len(chunk)], chunk.kv.to("cuda"))


def test_a_timeline_source_marks_every_layer(cuda_step):
    layout, prefix, chunks = _entries(cuda_step, seed=8)
    store, keys = _store(MemoryTier("cpu"), chunks)
    with torch.inference_mode():
        source = StoreSource(store, [prefix, *keys], device="cuda", timeline=True).begin()
        prefill(cuda_step, layout, BlendConfig(mode="blend", ratio=0.3), source)
    source.finish()
    rows = source.timeline_ms()
    assert [row["layer"] for row in rows] == list(range(source.n_layers))
    assert all(row["copy_start"] <= row["copy_end"] and row["asked"] <= row["compute_start"] for row in rows)


def test_a_source_with_nothing_to_copy_looks_each_layer_up_when_asked(cuda_step, tmp_path):
    """Every chunk in the GPU tier (and the prefix in memory) and left to the fusor (`into`'s device_too False, as
    below fusor.PLACE_ASIDE_FROM): no copies to keep in flight, so no layer is issued ahead of the one asked for (a
    lookup and two events each, on the head's critical path for nothing)."""
    layout, prefix, chunks = _entries(cuda_step, seed=9)
    store, keys = _store(_tier("gpu", tmp_path), chunks)
    cache = cuda_step.new_cache(len(layout) + 8)
    source = StoreSource(store, [prefix, *keys], device="cuda").begin()
    source.into(cache.data, [0] + layout.chunk_starts(), device_too=False)
    assert source._issued == -1 and source._plans is None  # (no copy plan: nothing to copy)
    for layer in range(source.n_layers):
        blocks = source.layer(layer)
        source.ahead()
        assert source._issued == layer
        for block, chunk in zip(blocks[1:], chunks):
            assert torch.equal(block, chunk.kv[layer].to("cuda"))
    assert source.finish().copy_bytes == 0


@pytest.mark.parametrize("aside", [False, True], ids=["turned-by-the-fusor", "turned-aside"])
@pytest.mark.parametrize(("lost_layer", "plan_layers"), [(0, 4), (2, 4), (3, 2), (2, 0)])
def test_a_layer_lost_mid_request_is_recomputed_into_the_request_buffer(cuda_step, lost_layer, plan_layers, aside,
                                                                         tmp_path, monkeypatch):
    """A CPU-tier chunk whose layer is evicted after its manifest was read is computed on the device on its own
    (`compute`); `into` claimed the chunk, so the fusor does not place it: the source writes the computed block
    into the buffer itself, and blend equals blend from memory (not zeros from that layer on). The copy plan finds
    the layer missing in its first pass (layer 0 or 2 of 4) or in a later one (layer 3, two layers a pass) and
    leaves it and the rest to the per-layer path; without a plan (0) that path alone. With the keys turned aside
    (`StoreSource.TURN_ASIDE`), each layer's turn follows the source's write of the computed block."""
    monkeypatch.setattr(StoreSource, "PLAN_LAYERS", plan_layers)
    monkeypatch.setattr(StoreSource, "TURN_ASIDE", aside)
    layout, prefix, chunks = _entries(cuda_step)
    store, keys = _store(_tier("cpu", tmp_path), chunks)
    config = BlendConfig(mode="blend", ratio=0.3)
    with torch.inference_mode():
        expected = prefill(cuda_step, layout, config, MemorySource([prefix, *chunks]))
        computed = []

        def compute(index):
            computed.append(index)
            return compute_kv(cuda_step, layout.chunks[index - 1], behind=prefix)

        source = StoreSource(store, [prefix, *keys], compute, device="cuda").begin()
        store.tiered.delete(layer_key(keys[1], lost_layer))  # evicted between the manifest read and the layer read
        got = prefill(cuda_step, layout, config, source)
        source.finish()
    assert computed == [2] and source.stats.computed == {2: f"missing layer {lost_layer}"}
    assert got.recomputed == expected.recomputed
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.cache.data[:, : got.length], expected.cache.data[:, : expected.length],
                               rtol=1e-5, atol=1e-5)


def _read_through(source: StoreSource, cache, starts) -> list[list]:
    """The fusor's calls without its compute: `into`, then each layer asked for and `ahead`; `finish`."""
    source.into(cache.data, starts)
    handed = []
    for layer in range(source.n_layers):
        handed.append(source.layer(layer))
        source.ahead()
    source.finish()
    return handed


def test_a_planned_source_looks_a_few_layers_up_a_pass_and_copies_what_the_per_layer_path_copies(monkeypatch):
    """With the copy plan (PLAN_LAYERS 4) every layer of every chunk is looked up in one pass a four layers and no
    layer through the per-layer path; the buffer, the blocks handed to the fusor and the request's figures equal
    the per-layer path's (PLAN_LAYERS 0), and both hold exactly the stored bytes."""
    deep = LlamaStep(tiny_model(num_hidden_layers=16).to("cuda"))
    layout, prefix, chunks = _entries(deep, seed=5)
    store, keys = _store(MemoryTier("cpu"), chunks)
    starts = [0] + layout.chunk_starts()
    runs = {}
    for plan_layers in (4, 0):
        gathers, passes = [], []
        with monkeypatch.context() as patch:
            patch.setattr(StoreSource, "PLAN_LAYERS", plan_layers)
            gather, blocks_from = StoreSource._gather, store.blocks_from
            patch.setattr(StoreSource, "_gather", lambda self, layer: gathers.append(layer) or gather(self, layer))
            patch.setattr(store, "blocks_from",
                          lambda pairs, layers: passes.append(list(layers)) or blocks_from(pairs, layers))
            cache = deep.new_cache(len(layout) + 8)
            source = StoreSource(store, [prefix, *keys], device="cuda").begin()
            handed = _read_through(source, cache, starts)
        runs[plan_layers] = (cache, source.stats, handed, gathers, passes)
    planned, per_layer = runs[4], runs[0]
    assert planned[3] == [] and planned[4] == [list(range(i, i + 4)) for i in range(0, 16, 4)]
    assert per_layer[3] == list(range(16)) and per_layer[4] == [[layer] for layer in range(16)]
    assert torch.equal(planned[0].data, per_layer[0].data)
    for start, chunk in zip(starts[1:], chunks):
        assert torch.equal(planned[0].data[:, start : start + len(chunk)], chunk.kv)
    total = sum(c.kv.numel() * c.kv.element_size() for c in chunks)
    for _, stats, _, _, _ in (planned, per_layer):
        assert stats.copy_bytes == total and stats.read_bytes == {"cpu": total} and stats.read_s["cpu"] > 0
        assert stats.tiers == ["memory", "cpu", "cpu", "cpu"] and stats.computed == {}
    for ours, theirs in zip(planned[2], per_layer[2]):
        assert len(ours) == len(theirs) == 4 and all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_a_block_evicted_after_its_layer_was_planned_is_still_copied_intact(cuda_step, monkeypatch):
    """The plan holds the blocks it looked up: evicted from the tier before their copies are issued (and pinned
    memory allocated since), they are still what is copied, not freed memory someone reused."""
    monkeypatch.setattr(StoreSource, "ISSUE_FIRST", 2)  # layers 2 and 3 planned by `into`, not yet issued
    monkeypatch.setattr(StoreSource, "PLAN_LAYERS", 4)
    layout, prefix, chunks = _entries(cuda_step, seed=12)
    store, keys = _store(MemoryTier("cpu"), chunks)
    starts = [0] + layout.chunk_starts()
    cache = cuda_step.new_cache(len(layout) + 8)
    source = StoreSource(store, [prefix, *keys], device="cuda").begin()
    source.into(cache.data, starts)
    n = source.n_layers
    assert source._planned == n - 1 and source._issued == 1 and sorted(source._plans) == [2, 3]
    for layer in range(n):
        store.tiered.delete(layer_key(keys[1], layer))
    gc.collect()
    other = [torch.full(chunks[1].kv[0].shape, 7.0).pin_memory() for _ in range(2 * n)]  # (may reuse freed blocks)
    for layer in range(n):
        source.layer(layer)
        source.ahead()
    source.finish()
    assert source.stats.computed == {} and len(other) == 2 * n
    for start, chunk in zip(starts[1:], chunks):
        assert torch.equal(cache.data[:, start : start + len(chunk)], chunk.kv)


def test_a_host_chunk_promoted_to_the_gpu_tier_mid_request_is_planned_as_a_device_copy(monkeypatch):
    """A chunk read from the CPU tier (so `into` claimed it) whose layers turn up in the GPU tier by the time the plan
    looks them up is copied into the buffer on the device, in the plan, next to the host copies of the others."""
    monkeypatch.setattr(StoreSource, "ISSUE_FIRST", 1)  # layers 1-3 planned by `into`, issued later
    monkeypatch.setattr(StoreSource, "PLAN_LAYERS", 4)
    gathers, gather = [], StoreSource._gather
    monkeypatch.setattr(StoreSource, "_gather", lambda self, layer: gathers.append(layer) or gather(self, layer))
    step = LlamaStep(tiny_model().to("cuda"))
    layout, prefix, chunks = _entries(step, seed=13)
    gpu, cpu = MemoryTier("gpu", "cuda"), MemoryTier("cpu")
    store, keys = _store(cpu, chunks)
    store = ChunkStore(TieredStore([gpu, cpu], [None, None]))  # the same CPU tier, a GPU tier above it, empty
    source = StoreSource(store, [prefix, *keys], device="cuda").begin()
    assert source.stats.tiers == ["memory", "cpu", "cpu", "cpu"]
    for layer in range(source.n_layers):  # promoted since
        gpu.put(layer_key(keys[1], layer), chunks[1].kv[layer])
    starts = [0] + layout.chunk_starts()
    cache = step.new_cache(len(layout) + 8)
    source.into(cache.data, starts)
    assert sorted(source._plans) == [1, 2, 3]
    assert all(len(moves) == 1 and moves[0][1].is_cuda for _, _, _, moves, _ in source._plans.values())
    for layer in range(source.n_layers):
        source.layer(layer)
        source.ahead()
    stats = source.finish()
    for start, chunk in zip(starts[1:], chunks):
        assert torch.equal(cache.data[:, start : start + len(chunk)], chunk.kv)
    assert gathers == []  # every layer from the plan
    size = [c.kv.numel() * c.kv.element_size() for c in chunks]
    assert stats.read_bytes == {"gpu": size[1], "cpu": size[0] + size[2]} and stats.copy_bytes == size[0] + size[2]


def test_a_buffer_the_chunks_do_not_fit_as_stored_gets_no_plan_and_the_per_layer_path_converts(cuda_step):
    """A request buffer of another dtype than the stored K/V (the plan's copies are raw bytes): no plan, and the
    per-layer path's PyTorch copies convert, as before the plan."""
    layout, prefix, chunks = _entries(cuda_step, seed=14)
    store, keys = _store(MemoryTier("cpu"), chunks)
    starts = [0] + layout.chunk_starts()
    data = torch.zeros(cuda_step.n_layers, len(layout) + 8, *chunks[0].kv.shape[2:], dtype=torch.float16,
                       device="cuda")
    source = StoreSource(store, [prefix, *keys], device="cuda").begin()
    source.into(data, starts)
    assert source._plans is None and source._issued == StoreSource.ISSUE_FIRST - 1
    for layer in range(source.n_layers):
        source.layer(layer)
        source.ahead()
    source.finish()
    for start, chunk in zip(starts[1:], chunks):
        assert torch.equal(data[:, start : start + len(chunk)], chunk.kv.half())


def test_a_planned_source_writes_a_pool_ranges_segments_and_nothing_outside_the_range(cuda_step, monkeypatch):
    """The served buffer is a range of the KV pool (a view whose layer stride is the pool's): the plan's raw copies
    land in each chunk's rows of every layer of the range and write nothing else of the pool."""
    gathers, gather = [], StoreSource._gather
    monkeypatch.setattr(StoreSource, "_gather", lambda self, layer: gathers.append(layer) or gather(self, layer))
    layout, prefix, chunks = _entries(cuda_step, seed=15)
    store, keys = _store(MemoryTier("cpu"), chunks)
    starts = [0] + layout.chunk_starts()
    capacity = len(layout) + 8
    shape = chunks[0].kv.shape[2:]
    pool = torch.full((cuda_step.n_layers, 3 * capacity, *shape), -3.0, dtype=chunks[0].kv.dtype, device="cuda")
    data = pool[:, capacity : 2 * capacity]

    class Range:  # what `_read_through` reads of a cache
        pass

    cache = Range()
    cache.data = data
    source = StoreSource(store, [prefix, *keys], device="cuda").begin()
    _read_through(source, cache, starts)
    assert gathers == []  # every layer copied from the plan
    for start, chunk in zip(starts[1:], chunks):
        assert torch.equal(data[:, start : start + len(chunk)], chunk.kv)
    outside = torch.cat((pool[:, :capacity], pool[:, 2 * capacity :], data[:, starts[-1] + len(chunks[-1]) :]), dim=1)
    assert bool((outside == -3.0).all())  # nor the range's rows past the chunks (the question's, spare ones)
    assert bool((data[:, : len(prefix)] == prefix.kv).all())  # the prefix placed by `into` on the compute stream


@pytest.mark.parametrize("ratio", [0.15, 0.5])
def test_keys_turned_aside_give_what_the_fusor_turning_them_gives(cuda_step, ratio, monkeypatch):
    """The served selector from the pinned CPU tier with the placed chunks' re-rotation on the source's own stream
    (`StoreSource.TURN_ASIDE`), against the fusor turning each layer on the compute stream: the same kernel on the
    same rows, so the same cache and logits to the bit; every layer turned once, by the source."""
    from services.settings import SERVED_SELECTOR

    layout, prefix, chunks = _entries(cuda_step, seed=6, lengths=(60, 45, 70, 52))
    store, keys = _store(MemoryTier("cpu"), chunks)
    config = BlendConfig(mode="blend", ratio=ratio, selector=SERVED_SELECTOR)
    streams = []  # the stream each layer's keys were turned on
    turn_keys = cuda_step.turn_keys
    monkeypatch.setattr(cuda_step, "turn_keys", lambda keys, turning: streams.append(
        torch.cuda.current_stream().cuda_stream) or turn_keys(keys, turning))
    monkeypatch.setattr(StoreSource, "TURN_ASIDE", False)
    with torch.inference_mode():
        plain = prefill(cuda_step, layout, config, StoreSource(store, [prefix, *keys], device="cuda").begin())
        compute = torch.cuda.current_stream().cuda_stream
        assert streams == [compute] * cuda_step.n_layers  # the fusor's: each layer on the compute stream
        streams.clear()
        monkeypatch.setattr(StoreSource, "TURN_ASIDE", True)
        source = StoreSource(store, [prefix, *keys], device="cuda", timeline=True).begin()
        aside = prefill(cuda_step, layout, config, source)
        source.finish()
    assert source._turner is None and source._last_turned == cuda_step.n_layers - 1
    assert len(streams) == cuda_step.n_layers and compute not in streams  # once a layer, all on the turn stream
    assert all(event is not None for event in source._turned)
    assert aside.recomputed == plain.recomputed > 0
    assert torch.equal(aside.logits, plain.logits)
    assert torch.equal(aside.cache.data[:, : plain.length], plain.cache.data[:, : plain.length])


_ISSUE, _MARK = StoreSource._issue, StoreSource._mark_written


def _turned_plus_one(step, monkeypatch, wait_for_writes: bool) -> list[bool]:
    """Per chunk, whether every layer's rows ended as stored + 1 under a turner that adds 1, with the compute and copy
    streams held back (a GPU sleep) before each layer is issued, so a turn that did not wait for a write lands first
    (`wait_for_writes` False: the compute-stream writes' events left out, a negative control)."""
    monkeypatch.setattr(StoreSource, "TURN_ASIDE", True)
    monkeypatch.setattr(StoreSource, "ISSUE_FIRST", 1)
    issue = _ISSUE

    def held_back(self, layer, behind=False):
        if layer == self._issued + 1:
            # The copies held back (a turn that did not wait for them would land first, then be copied over), the
            # compute stream three times as long (its writes land after the layer's copies are done).
            with torch.cuda.stream(self._copy_stream):
                torch.cuda._sleep(10_000_000)
            torch.cuda._sleep(30_000_000)
        issue(self, layer, behind)

    monkeypatch.setattr(StoreSource, "_issue", held_back)
    monkeypatch.setattr(StoreSource, "_mark_written", _MARK if wait_for_writes else (lambda self, layer: None))
    layout, prefix, chunks = _entries(step, seed=16)
    gpu, cpu = MemoryTier("gpu", "cuda"), MemoryTier("cpu")
    _, keys = _store(cpu, chunks)
    store = ChunkStore(TieredStore([gpu, cpu], [None, None]))
    source = StoreSource(store, [prefix, *keys], device="cuda").begin()
    for layer in range(1, source.n_layers):  # promoted since the request began (after `into` planned layer 0)
        gpu.put(layer_key(keys[2], layer), chunks[2].kv[layer])
    starts = [0] + layout.chunk_starts()
    cache = step.new_cache(len(layout) + 8)
    source.into(cache.data, starts)
    lo, hi = starts[1], starts[-1] + len(chunks[-1])
    assert source.turn_with(lambda layer: cache.data[layer, lo:hi].add_(1.0))
    for layer in range(source.n_layers):
        source.layer(layer)
        source.ahead()
    source.finish()
    return [torch.equal(cache.data[:, start : start + len(chunk)], chunk.kv.to("cuda") + 1.0)
            for start, chunk in zip(starts[1:], chunks)]


def test_a_turn_aside_follows_the_layers_copies_and_a_promoted_blocks_write_on_the_compute_stream(monkeypatch):
    """The source's re-rotation of a layer runs after everything that lands in its rows: the layer's copies (copy
    stream) and a promoted chunk's device copy (compute stream), both held back. A turner that adds 1 to the rows
    shows it: every layer of every chunk ends as stored + 1, the promoted chunk's too; without the wait for the
    compute stream's writes (the control) the promoted chunk's layers are turned before their write and lack it."""
    step = LlamaStep(tiny_model().to("cuda"))
    assert _turned_plus_one(step, monkeypatch, wait_for_writes=True) == [True, True, True]
    assert _turned_plus_one(step, monkeypatch, wait_for_writes=False) == [True, True, False]  # chunks[2] promoted


def test_a_source_turns_keys_aside_only_when_asked_and_after_into(cuda_step, monkeypatch):
    layout, prefix, chunks = _entries(cuda_step, seed=17)
    store, keys = _store(MemoryTier("cpu"), chunks)
    monkeypatch.setattr(StoreSource, "TURN_ASIDE", False)
    source = StoreSource(store, [prefix, *keys], device="cuda").begin()
    source.into(cuda_step.new_cache(len(layout) + 8).data, [0] + layout.chunk_starts())
    assert not source.turn_with(lambda layer: None)  # TURN_ASIDE off
    monkeypatch.setattr(StoreSource, "TURN_ASIDE", True)
    early = StoreSource(store, [prefix, *keys], device="cuda").begin()
    assert not early.turn_with(lambda layer: None)  # no buffer yet: nothing placed to turn
    source.close()
    early.close()


@pytest.mark.parametrize("plan_layers", [2, 0], ids=["planned", "per-layer"])
def test_gpu_tier_chunks_are_placed_on_the_copy_stream_and_give_what_the_fusor_placing_them_gives(
        cuda_step, plan_layers, monkeypatch):
    """`StoreSource.PLACE_DEVICE`: the GPU tier's chunks are copied into the request's buffer by the source, on its
    copy stream (held back here by a GPU sleep before every layer's copies, so a compute stream that did not wait for
    them would read stale rows), and re-rotated aside; the cache and logits are those of the fusor placing and turning
    them on the compute stream, to the bit, from the copy plan and from the per-layer path."""
    from services.settings import SERVED_SELECTOR

    layout, prefix, chunks = _entries(cuda_step, seed=8, lengths=(60, 45, 70))
    store, keys = _store(MemoryTier("gpu", "cuda"), chunks)
    config = BlendConfig(mode="blend", ratio=0.15, selector=SERVED_SELECTOR)
    monkeypatch.setattr(fusor, "PLACE_ASIDE_FROM", 0.1)  # (the served threshold may move: 0.15 is above this one)
    monkeypatch.setattr(StoreSource, "PLAN_LAYERS", plan_layers)
    issue = StoreSource._issue

    def held_back(self, layer, behind=False):
        with torch.cuda.stream(self._copy_stream):
            torch.cuda._sleep(2_000_000)
        issue(self, layer, behind)

    streams = []  # the stream each multi-tensor copy ran on (the fusor's placement and the source's D2D copies)
    foreach_copy = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda *args, **kwargs: streams.append(
        torch.cuda.current_stream().cuda_stream) or foreach_copy(*args, **kwargs))
    with torch.inference_mode():
        monkeypatch.setattr(StoreSource, "PLACE_DEVICE", False)
        inline = StoreSource(store, [prefix, *keys], device="cuda").begin()
        want = prefill(cuda_step, layout, config, inline)
        inline.finish()
        compute = torch.cuda.current_stream().cuda_stream
        assert streams and set(streams) == {compute}  # the fusor placed them, on the compute stream
        streams.clear()
        monkeypatch.setattr(StoreSource, "PLACE_DEVICE", True)
        monkeypatch.setattr(StoreSource, "_issue", held_back)
        source = StoreSource(store, [prefix, *keys], device="cuda").begin()
        got = prefill(cuda_step, layout, config, source)
        source.finish()
    assert set(streams) == {source._copy_stream.cuda_stream}  # every layer's, by the source on its copy stream
    assert (source._table is not None) == (plan_layers > 0)  # the copy plan carried them where it was on
    assert inline._host == [] and source._device_placed == {1, 2, 3}
    assert source._issued == cuda_step.n_layers - 1 and source._turned[-1] is not None  # placed and turned aside
    assert source.stats.copy_bytes == 0  # (device-to-device copies are not the host-to-device bandwidth's samples)
    assert got.recomputed == want.recomputed > 0
    assert torch.equal(got.logits, want.logits)
    assert torch.equal(got.cache.data[:, : want.length], want.cache.data[:, : want.length])


@pytest.mark.parametrize("plan_layers", [0, 2])
def test_a_gpu_tier_block_put_after_into_is_copied_only_once_written(cuda_step, plan_layers, monkeypatch):
    """PLACE_DEVICE: the source's device-to-device copies wait for the compute stream only where a GPU-tier entry
    was put since `into` (its write queued there, here behind a long kernel): the rows copied are the new blocks'
    (the layers looked up before the put keep the old ones they hold); where nothing was put, no copy waits beyond
    `into`'s one wait, so none waits for the layer the compute stream has just been given."""
    monkeypatch.setattr(StoreSource, "PLACE_DEVICE", True)
    monkeypatch.setattr(StoreSource, "ISSUE_FIRST", 1)
    monkeypatch.setattr(StoreSource, "PLAN_LAYERS", plan_layers)
    layout, prefix, chunks = _entries(cuda_step, seed=14)
    gpu = MemoryTier("gpu", "cuda")
    store, keys = _store(gpu, chunks)
    starts = [0] + layout.chunk_starts()
    waits = {}
    for late in (False, True):
        cache = cuda_step.new_cache(len(layout) + 8)
        source = StoreSource(store, [prefix, *keys], device="cuda").begin()
        copy, counted = source._copy_stream, waits.setdefault(late, [])
        copy.wait_event = lambda event, wait=copy.wait_event, counted=counted: counted.append(event) or wait(event)
        source.into(cache.data, starts)
        n, first_new = source.n_layers, max(source._issued, source._planned) + 1
        assert source._device_placed == {1, 2, 3} and 1 <= first_new < n
        if late:
            torch.cuda._sleep(100_000_000)  # the compute stream busy well past the host's lookups and copies
            for layer in range(first_new, n):  # written on the compute stream, after the sleep
                gpu.put(layer_key(keys[1], layer), chunks[1].kv[layer] * 2)
        for layer in range(n):
            source.layer(layer)
            source.ahead()
        source.finish()
        torch.cuda.synchronize()
        for start, chunk in zip(starts[1:], chunks):
            want = chunk.kv.clone()
            if late and chunk is chunks[1]:
                want[first_new:] *= 2
            assert torch.equal(cache.data[:, start : start + len(chunk)], want)
    # With nothing put, `into`'s wait alone; with the puts (all before the first layer), one more: the first copy after
    # them waits and takes their count as waited for, so no later layer's copy waits again.
    assert len(waits[False]) == 1 and len(waits[True]) == 2


@pytest.mark.parametrize("ratio", [0.05, 0.3])
def test_the_fusor_leaves_the_gpu_tier_to_the_source_only_from_its_ratio_on(cuda_step, ratio, monkeypatch):
    """With PLACE_DEVICE served, the fusor asks the source to place the GPU tier's chunks (`into`'s device_too) only
    where blend recomputes at least PLACE_ASIDE_FROM of the tokens (there the request is bound by the GPU, below by the
    host's issuing); below it the fusor places them on the compute stream, the source copies nothing. Either way the
    prefill is the one of the fusor placing them, to the bit."""
    from services.settings import SERVED_SELECTOR

    monkeypatch.setattr(fusor, "PLACE_ASIDE_FROM", 0.15)
    layout, prefix, chunks = _entries(cuda_step, seed=9, lengths=(60, 45, 70))
    store, keys = _store(MemoryTier("gpu", "cuda"), chunks)
    config = BlendConfig(mode="blend", ratio=ratio, selector=SERVED_SELECTOR)
    with torch.inference_mode():
        results = {}
        for place in (False, True):
            monkeypatch.setattr(StoreSource, "PLACE_DEVICE", place)
            source = StoreSource(store, [prefix, *keys], device="cuda").begin()
            results[place] = prefill(cuda_step, layout, config, source)
            source.finish()
    aside = ratio >= 0.15
    assert source._device_placed == ({1, 2, 3} if aside else set()) and bool(source._host) == aside
    assert (source._turned[-1] is not None) == aside  # the keys turned aside by the source, or by the fusor
    assert (source._table is not None) == aside  # below: no copy plan, each layer looked up when asked (as off)
    assert torch.equal(results[True].logits, results[False].logits)
    length = results[False].length
    assert torch.equal(results[True].cache.data[:, :length], results[False].cache.data[:, :length])


@pytest.mark.parametrize("ratio", [0.05, 0.3])
def test_where_the_request_is_bound_by_its_copies_into_starts_more_layers_in_one_lookup_with_the_same_prefill(
        cuda_step, ratio, monkeypatch):
    """Below PLACE_ASIDE_FROM the fusor asks `into` for the card's COPY_BOUND_FIRST layers' copies at once: they are
    looked up in one pass and issued before the first layer is asked for, and each later pass covers as many; from it
    on, the source's ISSUE_FIRST and passes of PLAN_LAYERS. Either way the prefill is the same, to the bit."""
    from services.settings import SERVED_SELECTOR

    monkeypatch.setattr(fusor, "PLACE_ASIDE_FROM", 0.15)
    monkeypatch.setattr(StoreSource, "ISSUE_FIRST", 2)
    monkeypatch.setattr(StoreSource, "PLAN_LAYERS", 2)
    deep = LlamaStep(tiny_model(num_hidden_layers=8).to("cuda"))
    layout, prefix, chunks = _entries(deep, seed=14, lengths=(60, 45, 70))
    store, keys = _store(MemoryTier("cpu"), chunks)
    config = BlendConfig(mode="blend", ratio=ratio, selector=SERVED_SELECTOR)
    seen = []
    into, plan = StoreSource.into, StoreSource._plan

    def recording_into(self, data, starts, device_too=True, first=None):
        placed = into(self, data, starts, device_too, first)
        seen.append((first, self._issued, self._planned))
        return placed

    def counting_plan(self, layer):
        seen.append(("plan", layer, self._plan_layers))
        return plan(self, layer)

    monkeypatch.setattr(StoreSource, "into", recording_into)
    monkeypatch.setattr(StoreSource, "_plan", counting_plan)
    with torch.inference_mode():
        results = {}
        for first in (None, 4):
            monkeypatch.setattr(fusor, "COPY_BOUND_FIRST", {torch.cuda.get_device_name(): first} if first else {})
            seen.clear()
            source = StoreSource(store, [prefix, *keys], device="cuda").begin()
            results[first] = prefill(deep, layout, config, source)
            source.finish()
            bound = ratio < 0.15 and first == 4
            # (the passed count, the last layer issued, the last planned) when `into` returned
            assert seen[1] == ((4, 3, 3) if bound else (None, 1, 1)), seen
            # One lookup pass for what starts, and as many layers a pass after (as ISSUE_FIRST, PLAN_LAYERS 4 would)
            passes = [entry for entry in seen if entry[0] == "plan"]
            assert passes[0] == ("plan", 0, 4 if bound else 2)
            assert [layer for _, layer, _ in passes] == list(range(0, deep.n_layers, 4 if bound else 2))
    assert torch.equal(results[4].logits, results[None].logits)
    length = results[None].length
    assert torch.equal(results[4].cache.data[:, :length], results[None].cache.data[:, :length])
