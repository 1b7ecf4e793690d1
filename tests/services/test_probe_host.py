"""`probe_host`'s request timing, run on the CPU (the probe itself needs a GPU): its marks and its per-part tables come
out whole and in order here, so a broken probe is found before device time is spent on it."""

import inspect

import torch
from tests.helpers.model import random_layout

from blend.fusor import BlendConfig, compute_kv
from services.bench.probe_host import PARTS, _Parts, timed_request
from store.chunks import ChunkStore
from store.keys import chunk_key
from store.memory_tier import MemoryTier
from store.source import StoreSource
from store.tiered import TieredStore


def test_the_timed_request_marks_its_phases_in_order_and_times_the_head_and_the_later_layers_by_part(tiny):
    layout = random_layout(seed=4, chunk_lengths=(20, 30, 25))
    with torch.inference_mode():
        prefix = compute_kv(tiny, layout.prefix)
        chunks = [compute_kv(tiny, ids, behind=prefix) for ids in layout.chunks]
    store = ChunkStore(TieredStore([MemoryTier("cpu")], [None]))
    keys = [chunk_key("fp", (), c.token_ids, c.kv.dtype) for c in chunks]
    for key, chunk in zip(keys, chunks):
        store.put(key, chunk)
    config = BlendConfig("blend", 0.3, selector="qattn+sink4+nofirst+cachedk")
    parts = _Parts()
    try:
        with torch.inference_mode():
            marks = timed_request(tiny, layout, config, lambda: StoreSource(store, [prefix, *keys]).begin(),
                                  parts=parts)
    finally:
        parts.restore()
    built, first, check, issued, done, each = marks
    assert 0 < built <= first <= check <= issued <= done and 0 < each < done
    assert {"StoreSource.__init__", "StoreSource.layer", "LlamaStep.qkv", "fusor.token_scores"} <= set(parts.total)
    assert not parts.on and 0 < parts.top <= check / 1e3
    later = _Parts()
    later.span = 0.0
    try:
        with torch.inference_mode():
            timed_request(tiny, layout, config, lambda: StoreSource(store, [prefix, *keys]).begin(), later=later)
    finally:
        later.restore()
    # Layers 2 to the one before the last of the tiny model's four: layer 2 alone, by part.
    assert not later.on and later.calls["LlamaStep.step"] == 1 and later.calls["StoreSource.layer"] == 1
    assert 0 < later.top <= later.span
    assert all(inspect.getattr_static(owner, name) is original for owner, name, original in later.saved)  # restored
    assert len(PARTS) == len(later.saved)
