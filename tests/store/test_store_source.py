"""The store-backed KVSource: same blocks as in memory, each chunk on its own, misses computed and kept."""

import pytest
import torch
from tests.helpers.kv import computing, make_chunk

from blend.fusor import MemorySource
from store.chunks import ChunkStore
from store.keys import chunk_key, layer_key
from store.memory_tier import MemoryTier
from store.disk_tier import DiskTier
from store.source import MissingChunk, StoreSource
from store.tiered import TieredStore

N_LAYERS = 4


def chunks_and_keys(count=3):
    chunks = [make_chunk(seed, n_layers=N_LAYERS, tokens=3 + seed, start=7 + seed) for seed in range(count)]
    return chunks, [chunk_key("fp", [], chunk.token_ids, chunk.kv.dtype) for chunk in chunks]


def new_store() -> ChunkStore:
    return ChunkStore(TieredStore([MemoryTier("cpu")], [None]))


def layers_of(source) -> list[list[torch.Tensor]]:
    return [list(source.layer(index)) for index in range(N_LAYERS)]


@pytest.mark.parametrize("tier", ["cpu", "disk"])
def test_source_yields_what_a_memory_source_yields(tier, tmp_path):
    """From a memory tier (read inline) and from disk (read ahead on the prefetch thread) alike."""
    chunks, keys = chunks_and_keys()
    store = new_store() if tier == "cpu" else ChunkStore(TieredStore([DiskTier(tmp_path)], [None]))
    for key, chunk in zip(keys, chunks):
        store.put(key, chunk)
    with StoreSource(store, keys) as source:
        assert source.stats.tiers == [tier] * 3
        expected = MemorySource(chunks)
        assert source.starts == expected.starts == [7, 8, 9]
        for ours, theirs in zip(layers_of(source), layers_of(expected)):
            assert len(ours) == 3 and all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_a_missing_chunk_is_computed_alone_and_written_back_the_others_come_from_the_store():
    chunks, keys = chunks_and_keys()
    store = new_store()
    store.put(keys[0], chunks[0])
    store.put(keys[2], chunks[2])
    compute, calls = computing(chunks)
    with StoreSource(store, keys, compute) as source:
        assert all(torch.equal(a, b) for a, b in zip(source.layer(1), MemorySource(chunks).layer(1)))
    assert calls == [1]
    assert torch.equal(store.get(keys[1]).kv, chunks[1].kv)  # the next request hits


def test_a_layer_lost_after_the_manifest_was_read_recomputes_that_chunk_only():
    chunks, keys = chunks_and_keys()
    store = new_store()
    for key, chunk in zip(keys, chunks):
        store.put(key, chunk)
    compute, calls = computing(chunks)
    source = StoreSource(store, keys, compute)
    store.tiered.delete(layer_key(keys[2], 2))  # evicted between the manifest read and the layer read
    layers = layers_of(source)
    assert calls == [2]
    assert all(torch.equal(a, b) for ours, theirs in zip(layers, layers_of(MemorySource(chunks)))
               for a, b in zip(ours, theirs))
    assert store.tiered.contains(layer_key(keys[2], 2))


def test_without_compute_a_missing_chunk_is_an_error_naming_it():
    chunks, keys = chunks_and_keys(1)
    with pytest.raises(MissingChunk, match=keys[0]):
        StoreSource(new_store(), keys)


def test_a_manifest_holding_other_tokens_than_the_prompt_expects_is_recomputed_not_used():
    """A forged or stale entry under a chunk's key never reaches the fusor."""
    chunks, keys = chunks_and_keys(2)
    store = new_store()
    store.put(keys[0], chunks[0])
    store.put(keys[1], chunks[1])
    compute, calls = computing(chunks)
    forged = list(chunks[0].token_ids)
    forged[0] += 1
    source = StoreSource(store, keys, compute, expected=[forged, chunks[1].token_ids])
    assert calls == [0] and source.stats.computed == {0: "not in the store"}


def test_segments_the_controller_skips_are_never_read_and_come_as_none():
    chunks, keys = chunks_and_keys()
    store = new_store()
    for key, chunk in zip(keys, chunks):
        store.put(key, chunk)
    store.tiered.delete(layer_key(keys[1], 0))  # reading it would fail and need compute
    source = StoreSource(store, keys).begin(skip=[1])
    for layer in range(N_LAYERS):
        blocks = source.layer(layer)
        assert blocks[1] is None and torch.equal(blocks[2], chunks[2].kv[layer])


def test_get_or_compute_looks_up_each_chunk_on_its_own():
    chunks, keys = chunks_and_keys()
    store = new_store()
    store.put(keys[1], chunks[1])
    compute, calls = computing(chunks)
    out = store.get_or_compute(keys, compute)
    assert calls == [0, 2] and all(torch.equal(a.kv, b.kv) for a, b in zip(out, chunks))
    store.get_or_compute(keys, compute)
    assert calls == [0, 2]


def test_a_chunk_with_a_missing_layer_is_a_miss_not_a_partial_chunk():
    chunks, keys = chunks_and_keys(1)
    store = new_store()
    store.put(keys[0], chunks[0])
    store.tiered.delete(layer_key(keys[0], N_LAYERS - 1))
    assert store.get(keys[0]) is None


def test_several_layers_of_several_chunks_are_looked_up_in_one_pass_as_each_layer_is_alone():
    chunks, keys = chunks_and_keys()
    store = new_store()
    for key, chunk in zip(keys, chunks):
        store.put(key, chunk)
    store.tiered.delete(layer_key(keys[1], 2))  # a miss among hits
    pairs = [(key, store.manifest(key)) for key in keys]
    hits_before = store.tiered.stats()["cpu"].hits
    many = store.blocks_from(pairs, [1, 2, 3])
    assert store.tiered.stats()["cpu"].hits - hits_before == 8  # every block once: 9 asked, 1 missing
    for layer, row in zip([1, 2, 3], many):
        alone = store.layers_from(pairs, layer)
        assert [tier for _, tier in row] == [tier for _, tier in alone]
        assert all((a is None and b is None) or torch.equal(a, b) for (a, _), (b, _) in zip(row, alone))
    assert many[1][1] == (None, None) and torch.equal(many[0][2][0], chunks[2].kv[1])
    with pytest.raises(ValueError, match="layer 4 is outside the chunk's 4 layers"):
        store.blocks_from(pairs, [3, 4])


def test_put_refuses_kv_that_does_not_fit_its_tokens():
    chunk = make_chunk(0, tokens=4)
    bad = type(chunk)(token_ids=chunk.token_ids[:3], start=0, kv=chunk.kv)
    with pytest.raises(ValueError, match="3 tokens"):
        new_store().put(chunk_key("fp", [], bad.token_ids, torch.float32), bad)


def test_a_key_that_is_not_a_content_address_is_refused():
    with pytest.raises(ValueError, match="'chunk-1'"):
        new_store().put("chunk-1", make_chunk(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_source_delivers_each_layer_on_the_gpu():
    chunks, keys = chunks_and_keys()
    store = new_store()
    for key, chunk in zip(keys, chunks):
        store.put(key, chunk)
    assert store.tiered.tiers[0].pin  # the CPU tier holds pinned memory when CUDA is present
    with StoreSource(store, keys, device="cuda") as source:
        # Checked as each layer arrives: a layer's blocks live in one of two staging buffers, refilled
        # two layers later (the fusor places them into the request's buffer before asking for more).
        for layer in range(N_LAYERS):
            blocks = source.layer(layer)
            assert all(block.is_cuda and torch.equal(block.cpu(), chunk.kv[layer])
                       for block, chunk in zip(blocks, chunks))


def test_contains_means_every_layer_is_there_and_counts_no_use():
    chunks, keys = chunks_and_keys(1)
    store = new_store()
    assert not store.contains(keys[0])
    store.put(keys[0], chunks[0])
    assert store.contains(keys[0]) and store.tiered.sketch.estimate(keys[0]) == 0
    store.tiered.delete(layer_key(keys[0], 1))
    assert not store.contains(keys[0])


def test_delete_removes_every_entry_of_the_chunk_and_nothing_else():
    chunks, keys = chunks_and_keys(2)
    store = new_store()
    for key, chunk in zip(keys, chunks):
        store.put(key, chunk)
    store.delete(keys[0])
    assert {key.split(":")[0] for key, _ in store.tiered.tiers[0].entries()} == {keys[1]}
    assert store.get(keys[0]) is None and torch.equal(store.get(keys[1]).kv, chunks[1].kv)


def test_a_chunk_with_one_layer_left_only_on_disk_is_a_disk_chunk_read_ahead_and_timed_per_tier(tmp_path):
    """Tiers evict layer by layer. A chunk whose layer 0 is in the CPU tier but whose layer 2 is only
    on disk arrives at disk speed: the source says so (so the controller plans with disk's rate), reads
    it on the prefetch thread, and times each read against the tier that served it."""
    chunks, keys = chunks_and_keys(2)
    cpu, disk = MemoryTier("cpu"), DiskTier(tmp_path)
    store = ChunkStore(TieredStore([cpu, disk], [None, None], write_through=True))
    for key, chunk in zip(keys, chunks):
        store.put(key, chunk)
    cpu.delete(layer_key(keys[1], 2))  # as if the CPU tier had evicted that one layer
    with StoreSource(store, keys) as source:
        assert source.stats.tiers == ["cpu", "disk"]
        assert source.begin()._slow == [1]
        for ours, theirs in zip(layers_of(source), layers_of(MemorySource(chunks))):
            assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    size = [chunk.kv[0].numel() * chunk.kv[0].element_size() for chunk in chunks]  # one layer's bytes
    # Chunk 1's layer 2 came from disk (then promoted); its other layers and all of chunk 0's from memory.
    assert source.stats.read_bytes["disk"] == size[1]
    assert source.stats.read_bytes["cpu"] == N_LAYERS * size[0] + (N_LAYERS - 1) * size[1]


def test_a_slow_tier_chunk_gone_missing_is_recomputed_on_the_model_thread_not_the_prefetch_thread(tmp_path):
    """A disk chunk's layer lost after its manifest was read: the prefetch thread, which reads disk and Redis ahead,
    leaves it out, and the reading (model) thread recomputes it, so the model's step (whose graphs share buffers between
    requests) never runs on two threads; the chunk then comes whole from the recomputed K/V."""
    import threading

    chunks, keys = chunks_and_keys(2)
    store = ChunkStore(TieredStore([DiskTier(tmp_path)], [None]))
    for key, chunk in zip(keys, chunks):
        store.put(key, chunk)
    threads = []
    compute, calls = computing(chunks)
    with StoreSource(store, keys, lambda index: threads.append(threading.current_thread()) or compute(index)) as source:
        assert source.begin()._slow == [0, 1]
        store.tiered.delete(layer_key(keys[1], 2))  # (layers 0 and 1 are read ahead already or about to be)
        got = layers_of(source)
    assert calls == [1] and threads == [threading.main_thread()]
    for ours, theirs in zip(got, layers_of(MemorySource(chunks))):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("starts,lengths,indices", [
    ([0, 3, 8, 8, 12], [3, 5, 0, 4, 2], [1, 2, 3, 4]),  # back to back (one empty): one split a layer
    ([0, 3, 8, 12], [3, 5, 4, 2], [3, 1]),  # a gap (segment 2 not asked for): a view each
    ([5, 0], [4, 5], [0, 1]),  # out of order, back to back
])
def test_layer_views_are_each_segments_own_slice_of_the_layer(starts, lengths, indices):
    """The views a layer's copies land in (`into`): segment i's tokens of that layer, writable into the buffer."""
    from store.source import layer_views

    data = torch.zeros(3, 16, 2, 1, 2)
    views = layer_views(data, starts, lengths, indices)
    for layer in range(3):
        got = views(layer)
        assert sorted(got) == sorted(indices)
        for index, view in got.items():
            view.fill_(10 * layer + index + 1)
            assert view.shape == (lengths[index], 2, 1, 2)
    for layer in range(3):
        for index in indices:
            expected = torch.full((lengths[index], 2, 1, 2), 10.0 * layer + index + 1)
            assert torch.equal(data[layer, starts[index] : starts[index] + lengths[index]], expected)


def _pointers_of(data, starts, manifests):
    """`StoreSource._pointers` for a request buffer `data` and segments at `starts` (one manifest each), on the device
    `data` is on: what the copy plan's raw copies would write."""
    from types import SimpleNamespace

    holder = SimpleNamespace(_buffer=(data, starts), device=data.device, _host=list(range(len(manifests))),
                             manifests=manifests)
    return StoreSource._pointers(holder)


def _manifest(tokens, kv_heads=2, head_dim=4, dtype=torch.float32):
    from store.chunks import Manifest

    return Manifest(tuple(range(tokens)), 0, 3, kv_heads, head_dim, dtype)


def test_the_copy_plans_addresses_are_each_segments_view_in_a_pool_range_and_nothing_outside_it():
    """The plan writes by raw addresses (no view, no bounds check of PyTorch's): in a request's range of a KV pool
    (a view whose layer stride is the pool's), each segment's address and size are those of its view, every layer."""
    pool = torch.zeros(3, 40, 2, 2, 4)
    data = pool[:, 11:29]  # the request's range: 18 token rows of every layer
    manifests, starts = [_manifest(5), _manifest(7)], [2, 9]
    base, layer_bytes, places = _pointers_of(data, starts, manifests)
    for layer in range(3):
        for index, manifest in enumerate(manifests):
            view = data[layer, starts[index] : starts[index] + len(manifest.token_ids)]
            offset, size = places[index]
            assert (base + layer * layer_bytes + offset, size) == (view.data_ptr(), view.nbytes)
    assert layer_bytes == pool.stride(0) * pool.element_size()


@pytest.mark.parametrize("case", ["past the end", "before the start", "other dtype", "other token shape",
                                  "rows apart", "layers overlapping"])
def test_a_buffer_the_segments_do_not_fit_gets_no_copy_plan(case):
    """Where a raw copy could write outside a segment's place (its rows past the buffer's, a token of another size,
    rows not back to back) the plan is refused (None) and the per-layer path's checked copies take the request."""
    data, starts, manifests = torch.zeros(3, 18, 2, 2, 4), [2, 9], [_manifest(5), _manifest(7)]
    if case == "past the end":
        starts = [2, 12]  # 12 + 7 > 18
    elif case == "before the start":
        starts = [-1, 9]
    elif case == "other dtype":
        manifests = [_manifest(5), _manifest(7, dtype=torch.bfloat16)]
    elif case == "other token shape":
        manifests = [_manifest(5), _manifest(7, head_dim=8)]
    elif case == "rows apart":
        data = torch.zeros(3, 18, 2, 2, 8)[..., :4]  # a token's numbers not back to back
    else:
        data = torch.zeros(60, 2, 2, 4).as_strided((3, 18, 2, 2, 4), (16 * 16, 16, 8, 4, 1))  # layer stride < 18 rows
    assert _pointers_of(data, starts, manifests) is None


def test_a_one_token_buffer_whose_token_stride_is_not_a_tokens_size_gets_no_copy_plan():
    """`is_contiguous` ignores the stride of a dimension of size 1; the plan's token size does not trust it."""
    data = torch.zeros(3, 4, 2, 2, 4)[:, :1].as_strided((3, 1, 2, 2, 4), (64, 32, 8, 4, 1))
    assert data[0].is_contiguous() and data.stride(1) != 16
    assert _pointers_of(data, [0], [_manifest(1)]) is None


def test_a_cpu_source_leaves_the_re_rotation_to_the_fusor(monkeypatch):
    """`turn_with` is a CUDA source's (a stream of its own): on the CPU it declines, so blend turns keys as before."""
    monkeypatch.setattr(StoreSource, "TURN_ASIDE", True)
    chunks, keys = chunks_and_keys()
    store = new_store()
    for key, chunk in zip(keys, chunks):
        store.put(key, chunk)
    source = StoreSource(store, keys).begin()
    assert not source.turn_with(lambda layer: None)


def test_the_gpu_memory_tiers_puts_are_counted_and_a_tier_that_does_not_count_makes_every_copy_wait():
    """`StoreSource._device_writes`: one count per tier held in GPU memory (a MemoryTier counts only GPU blocks put, so
    a CPU tier is not among them); a GPU-memory tier without the count gives None, on which every device-to-device copy
    of the GPU tier waits for the compute stream (PLACE_DEVICE). Checked on the CPU: no block is put on a GPU here."""

    class Uncounted:  # a tier held in GPU memory that keeps no count of its puts
        name, device = "gpu", "cuda"

    class Counted:  # one that does (a MemoryTier on a GPU, which this machine may not have)
        def __init__(self, name, device, writes):
            self.name, self.device, self.writes = name, device, writes

    cpu = MemoryTier("cpu")
    cpu.put("k", torch.ones(2))
    assert cpu.writes == 0  # a host block: nothing a device copy could overtake
    only_cpu = StoreSource(ChunkStore(TieredStore([cpu], [None])), [])
    assert only_cpu._device_writes() == ()
    first, second = Counted("gpu", torch.device("cuda", 0), 3), Counted("gpu2", "cuda:1", 0)
    counted = StoreSource(ChunkStore(TieredStore([first, cpu, second], [None, None, None])), [])
    assert counted._device_writes() == (3, 0)
    first.writes += 1  # a put since: the counts differ from those waited for
    assert counted._device_writes() == (4, 0)
    uncounted = StoreSource(ChunkStore(TieredStore([Uncounted(), cpu], [None, None])), [])
    assert uncounted._device_writes() is None


@pytest.mark.parametrize("first", [0, -1, 2.0, True, "4"])
def test_into_refuses_a_count_of_first_layers_that_is_not_a_positive_int_naming_it(first):
    chunks, keys = chunks_and_keys()
    store = new_store()
    for key, chunk in zip(keys, chunks):
        store.put(key, chunk)
    source = StoreSource(store, keys).begin()
    with pytest.raises(ValueError, match=f"first={first!r}"):
        source.into(torch.zeros(N_LAYERS, 32, 2, 1, 4), [0, 4, 9], first=first)
