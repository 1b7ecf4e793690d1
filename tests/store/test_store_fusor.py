"""The fusor reads the store through StoreSource and gets what it gets from memory, to the bit."""

import torch

from tests.helpers.kv import stored_prompt

from blend.fusor import BlendConfig, MemorySource, compute_kv, prefill
from store.chunks import ChunkStore
from store.disk_tier import DiskTier
from store.memory_tier import MemoryTier
from store.source import StoreSource
from store.tiered import TieredStore

CONFIG = BlendConfig(mode="blend", ratio=0.3)


def layout_and_entries(step):
    return stored_prompt(step, 3, (9, 14, 11))


def blend(step, layout, source):
    with torch.inference_mode():
        return prefill(step, layout, CONFIG, source)


def test_blend_from_a_cpu_and_disk_store_equals_blend_from_memory(tiny, tmp_path):
    layout, entries, keys = layout_and_entries(tiny)
    layer_bytes = entries[1].kv[0].numel() * entries[1].kv[0].element_size()
    # A CPU budget of a few layers: most entries are demoted to disk and come back through the codec.
    store = ChunkStore(TieredStore([MemoryTier("cpu"), DiskTier(tmp_path)], [4 * layer_bytes, None]))
    for key, entry in zip(keys, entries):
        store.put(key, entry)
    assert len(list(store.tiered.tiers[1].entries())) > len(list(store.tiered.tiers[0].entries()))
    expected = blend(tiny, layout, MemorySource(entries))
    with StoreSource(store, keys) as source:
        got = blend(tiny, layout, source)
    assert torch.equal(got.logits, expected.logits) and got.recomputed == expected.recomputed


def test_a_chunk_missing_from_the_store_is_computed_and_the_answer_is_the_same(tiny):
    layout, entries, keys = layout_and_entries(tiny)
    store = ChunkStore(TieredStore([MemoryTier("cpu")], [None]))
    for key, entry in zip(keys[:2] + keys[3:], entries[:2] + entries[3:]):
        store.put(key, entry)
    calls = []

    def compute(index):
        calls.append(index)
        return compute_kv(tiny, layout.chunks[index - 1], behind=entries[0])

    with StoreSource(store, keys, compute) as source:
        got = blend(tiny, layout, source)
    assert calls == [2]
    assert torch.equal(got.logits, blend(tiny, layout, MemorySource(entries)).logits)
    assert store.get(keys[2]) is not None
