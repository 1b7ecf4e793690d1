"""Attention padded to bucket shapes (what the step does on CUDA, where cuDNN builds a plan per new
shape) computes exactly what exact shapes compute, in every mode; tried here on the CPU by setting the
buckets by hand, with buckets small enough that the tiny prompts get padded rows and keys."""

import pytest
import torch

from blend.adapter import LlamaStep, round_up
from blend.decode import greedy
from blend.fusor import BlendConfig, MemorySource, cached_entries, compute_kv, prefill
from tests.helpers import model
from tests.helpers.model import random_layout

MODES = [BlendConfig(mode="full"), BlendConfig(mode="prefix"), BlendConfig(mode="reuse"),
         BlendConfig(mode="blend", ratio=0.3), BlendConfig(mode="blend", ratio=0.3, selector="k"),
         BlendConfig(mode="blend", ratio=0.5, gradual_layers=3)]


def _prefill_and_answer(step, layout, config):
    with torch.inference_mode():
        prefix = compute_kv(step, layout.prefix)
        chunks = [compute_kv(step, ids, behind=prefix) for ids in layout.chunks]
        source = MemorySource(cached_entries(config.mode, prefix, chunks, layout))
        filled = prefill(step, layout, config, source if config.mode != "full" else None, len(layout) + 6)
        answer = list(greedy(step, filled.cache, filled.length, filled.logits, 6, stop_ids=set()))
    return filled, chunks, answer


@pytest.mark.parametrize("config", MODES, ids=lambda c: c.label)
def test_padded_attention_equals_exact_attention(config):
    exact = LlamaStep(model.tiny_model())
    padded = LlamaStep(model.tiny_model())
    padded.attention_buckets = (8, 16)
    assert exact.attention_buckets is None  # CPU default: exact shapes
    layout = random_layout(seed=5)
    want, want_chunks, want_answer = _prefill_and_answer(exact, layout, config)
    got, got_chunks, got_answer = _prefill_and_answer(padded, layout, config)
    assert got.cache.capacity == round_up(len(layout) + 6, 16) > want.cache.capacity
    assert (got.logits - want.logits).abs().max() < 1e-5
    assert got.recomputed == want.recomputed
    assert got_answer == want_answer
    # Chunk KV computed into a padded buffer is the chunk's tokens only, and the same values.
    for a, b in zip(got_chunks, want_chunks):
        assert a.kv.shape == b.kv.shape and (a.kv - b.kv).abs().max() < 1e-5


def test_padded_mask_shape_and_rows():
    step = LlamaStep(model.tiny_model())
    step.attention_buckets = (8, 16)
    positions = torch.tensor([3, 7, 9])
    mask = step.mask(positions, 10, capacity=32)
    assert mask.shape == (1, 1, 8, 16)
    assert torch.isinf(mask[0, 0, 0, 4:]).all() and (mask[0, 0, 0, :4] == 0).all()
    assert (mask[0, 0, 3:, 0] == 0).all() and torch.isinf(mask[0, 0, 3:, 1:]).all()  # padding sees key 0
    assert step.mask(torch.arange(10), 10, capacity=32) is None  # plain causal
    # No room in the buffer for the key bucket: exact shapes.
    assert step.mask(positions, 10, capacity=12).shape == (1, 1, 3, 10)


def test_start_up_warms_every_padded_causal_shape_a_prompt_can_take(monkeypatch):
    """`warm_attention` runs plain causal attention at every multiple of the key bucket up to the longest cache, with
    the served call's layout (query and key strides): a full prefill's and a blend's plain causal calls are all
    among the shapes warmed, so on CUDA none builds a plan on a request."""
    import torch.nn.functional as F

    step = LlamaStep(model.tiny_model())
    step.attention_buckets = (8, 32)
    real, calls = F.scaled_dot_product_attention, []

    def recording(q, k, v, attn_mask=None, is_causal=False, **kwargs):
        if is_causal and attn_mask is None:
            calls.append((tuple(q.shape), q.stride(), tuple(k.shape), k.stride()))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    assert step.warm_attention(100) == 4  # 32, 64, 96, 128
    warmed = set(calls)
    assert {shape[0][2] for shape in warmed} == {32, 64, 96, 128}
    calls.clear()
    for lengths in ((20, 31, 17), (9, 12)):
        layout = random_layout(seed=len(lengths), chunk_lengths=lengths)
        for config in (BlendConfig(mode="full"), BlendConfig(mode="prefix"), BlendConfig(mode="blend", ratio=0.3)):
            _prefill_and_answer(step, layout, config)
    assert calls and set(calls) <= warmed
    step.attention_buckets = None
    assert step.warm_attention(100) == 0  # the CPU default: no buckets, nothing to warm
