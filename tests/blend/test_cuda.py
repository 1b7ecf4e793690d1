"""GPU-only facts (skipped without CUDA; run on the lent H100): the pipelined source changes timing,
never results."""

import pytest
import torch

from blend.adapter import LlamaStep
from blend.fusor import BlendConfig, MemorySource, compute_kv, prefill
from tests.conftest import tiny_model
from tests.test_fusor import _layout

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def cuda_step():
    return LlamaStep(tiny_model().to("cuda"))


@pytest.mark.parametrize("ratio", [0.0, 0.3, 1.0])
def test_pipelined_and_sync_sources_give_the_memory_source_result(cuda_step, ratio):
    from store.cuda_source import PipelinedSource, SyncPinnedSource, pin

    layout = _layout(seed=11, chunk_lengths=(30, 25, 40))
    with torch.inference_mode():
        prefix = compute_kv(cuda_step, layout.prefix)
        entries = [prefix] + [compute_kv(cuda_step, ids, behind=prefix) for ids in layout.chunks]
        pinned = pin(entries)
        config = BlendConfig(mode="blend", ratio=ratio)
        expected = prefill(cuda_step, layout, config, MemorySource(entries)).logits
        for source in (PipelinedSource(pinned), SyncPinnedSource(pinned)):
            got = prefill(cuda_step, layout, config, source).logits
            assert torch.equal(got, expected)


def test_pipelined_source_refuses_pageable_memory(cuda_step):
    from store.cuda_source import PipelinedSource

    layout = _layout(seed=12)
    with torch.inference_mode():
        prefix = compute_kv(cuda_step, layout.prefix)
    entry = prefix.__class__(prefix.token_ids, prefix.start, prefix.kv.cpu())
    with pytest.raises(ValueError, match="pinned"):
        PipelinedSource([entry])
