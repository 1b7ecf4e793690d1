"""Facts about the four modes on a tiny random Llama: they are one loop over different positions."""

import pytest
import torch

from blend.decode import greedy
from blend.fusor import BlendConfig, MemorySource, cached_entries, compute_kv, prefill
from tests.helpers.model import random_layout


def _run(step, layout, config, capacity=None):
    prefix = compute_kv(step, layout.prefix)
    chunks = [compute_kv(step, ids, behind=prefix) for ids in layout.chunks]
    source = MemorySource(cached_entries(config.mode, prefix, chunks, layout))
    with torch.inference_mode():
        return prefill(step, layout, config, source if config.mode != "full" else None, capacity)


def _answer(step, filled, n=8):
    with torch.inference_mode():
        return list(greedy(step, filled.cache, filled.length, filled.logits, n, stop_ids=set()))


def test_blend_ratio_one_reproduces_full(tiny):
    layout = random_layout()
    full = _run(tiny, layout, BlendConfig(mode="full"), len(layout) + 8)
    blend = _run(tiny, layout, BlendConfig(mode="blend", ratio=1.0), len(layout) + 8)
    assert (blend.logits - full.logits).abs().max() < 1e-4
    assert blend.recomputed == sum(map(len, layout.chunks))
    assert _answer(tiny, blend) == _answer(tiny, full)


def test_gradual_filtering_at_ratio_one_reproduces_full(tiny):
    layout = random_layout(seed=3)
    full = _run(tiny, layout, BlendConfig(mode="full"))
    blend = _run(tiny, layout, BlendConfig(mode="blend", ratio=1.0, gradual_layers=3))
    assert (blend.logits - full.logits).abs().max() < 1e-4


def test_reuse_of_one_chunk_at_its_computed_position_reproduces_full(tiny):
    layout = random_layout(seed=1, chunk_lengths=(12,))
    full = _run(tiny, layout, BlendConfig(mode="full"), len(layout) + 8)
    reuse = _run(tiny, layout, BlendConfig(mode="reuse"), len(layout) + 8)
    assert (reuse.logits - full.logits).abs().max() < 1e-4
    assert _answer(tiny, reuse) == _answer(tiny, full)


def test_prefix_mode_reproduces_full(tiny):
    """Prefix caching reuses only the exact prefix (system prompt + first chunk), so it is lossless."""
    layout = random_layout(seed=2)
    full = _run(tiny, layout, BlendConfig(mode="full"))
    prefix = _run(tiny, layout, BlendConfig(mode="prefix"))
    assert (prefix.logits - full.logits).abs().max() < 1e-4


def test_reuse_of_several_chunks_differs_from_full(tiny):
    """Chunks that never attended to each other are not full prefill: the test above could not pass
    by accident of a mode silently falling back to full."""
    layout = random_layout(seed=4)
    full = _run(tiny, layout, BlendConfig(mode="full"))
    reuse = _run(tiny, layout, BlendConfig(mode="reuse"))
    assert (reuse.logits - full.logits).abs().max() > 1e-3


def test_blend_ratio_zero_matches_reuse(tiny):
    """Ratio 0 recomputes only the question from the check layer on. Layer 0 still recomputes every
    token, whose K/V equal the re-rotated cache up to float rounding, so the match is within 1e-5,
    not bitwise; from the check layer on every chunk position keeps its cached K/V exactly."""
    layout = random_layout(seed=5)
    reuse = _run(tiny, layout, BlendConfig(mode="reuse"))
    blend = _run(tiny, layout, BlendConfig(mode="blend", ratio=0.0))
    assert blend.recomputed == 0
    assert (blend.logits - reuse.logits).abs().max() < 1e-5
    chunk_end = len(layout) - len(layout.suffix)
    assert torch.equal(blend.cache.data[1:, :chunk_end], reuse.cache.data[1:, :chunk_end])


def test_blend_recomputes_the_requested_fraction(tiny):
    layout = random_layout(seed=6, chunk_lengths=(20, 20, 20))
    blend = _run(tiny, layout, BlendConfig(mode="blend", ratio=0.25))
    assert blend.recomputed == round(0.25 * 60)
    reuse = _run(tiny, layout, BlendConfig(mode="reuse"))
    assert (blend.logits - reuse.logits).abs().max() > 1e-4


@pytest.mark.parametrize(
    "kwargs,named",
    [
        ({"mode": "fast"}, "'fast'"),
        ({"ratio": 1.5}, "1.5"),
        ({"ratio": -0.1}, "-0.1"),
        ({"selector": "q"}, "'q'"),
        ({"check_layer": 0}, "check layer 0"),
    ],
)
def test_bad_blend_settings_name_the_value(kwargs, named):
    with pytest.raises(ValueError, match=named):
        BlendConfig(**kwargs)


def test_check_layer_past_the_model_is_refused(tiny):
    with pytest.raises(ValueError, match="check layer 9"):
        _run(tiny, random_layout(), BlendConfig(mode="blend", check_layer=9))


def test_cache_for_other_tokens_is_refused(tiny):
    layout = random_layout(seed=7)
    prefix = compute_kv(tiny, layout.prefix)
    chunks = [compute_kv(tiny, ids, behind=prefix) for ids in reversed(layout.chunks)]
    with pytest.raises(ValueError, match="chunk 0"):
        cached_entries("blend", prefix, chunks, layout)


def test_blend_with_every_chunk_prefilled_in_full_reproduces_full(tiny):
    """The loading controller's fallback: chunks not loaded are computed in every layer."""
    layout = random_layout(seed=8)
    prefix = compute_kv(tiny, layout.prefix)
    full = _run(tiny, layout, BlendConfig(mode="full"))
    source = MemorySource([prefix] + [None] * len(layout.chunks))
    with torch.inference_mode():
        blend = prefill(tiny, layout, BlendConfig(mode="blend", ratio=0.0), source,
                        recompute=range(len(layout.chunks)))
    assert (blend.logits - full.logits).abs().max() < 1e-4
    assert blend.recomputed == sum(map(len, layout.chunks))


def test_blend_with_one_chunk_prefilled_keeps_all_of_it(tiny):
    layout = random_layout(seed=9, chunk_lengths=(10, 10, 10))
    prefix = compute_kv(tiny, layout.prefix)
    chunks = [compute_kv(tiny, ids, behind=prefix) for ids in layout.chunks]
    with torch.inference_mode():
        blend = prefill(tiny, layout, BlendConfig(mode="blend", ratio=0.1),
                        MemorySource([prefix, chunks[0], None, chunks[2]]), recompute=[1])
    assert blend.recomputed == 10 + round(0.1 * 20)
    with pytest.raises(ValueError, match="recompute chunks"):
        prefill(tiny, layout, BlendConfig(mode="reuse"), MemorySource([prefix] + chunks), recompute=[1])


@pytest.mark.parametrize("buckets", [None, (8, 16)], ids=["exact", "padded"])
@pytest.mark.parametrize("mode", ["prefix", "blend"])
def test_a_contiguous_suffix_of_most_keys_attends_as_plain_causal_with_the_same_result(mode, buckets):
    """Prefix mode's computed tokens, and blend's layers up to the check, are the positions first..n-1:
    attention then runs as plain causal over every key with zero query rows in front (SuffixCausal),
    and gives what the dense mask gives (logits and every cached K/V)."""
    from blend.adapter import LlamaStep, SuffixCausal
    from tests.helpers import model

    layout = random_layout(seed=5, chunk_lengths=(6, 14, 11))
    runs = []
    for suffix in (True, False):
        step = LlamaStep(model.tiny_model())
        step.attention_buckets = buckets
        plain = step.mask
        seen = []

        def mask(positions, length, capacity, start=None, plain=plain, suffix=suffix, seen=seen):
            out = plain(positions, length, capacity, start if suffix else None)
            seen.append(isinstance(out, SuffixCausal))
            return out
        step.mask = mask
        runs.append((_run(step, layout, BlendConfig(mode=mode, ratio=0.3), len(layout) + 4), any(seen)))
    (fast, used), (dense, unused) = runs
    assert used and not unused
    torch.testing.assert_close(fast.logits, dense.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.cache.data, dense.cache.data, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sizes,n_floats", [((5, 0, 3), 7), ((4, 6), None), ((1,), 2), ((2, 2), 0)])
def test_the_set_up_arrays_arrive_whole_in_one_copy_each_view_16_byte_aligned(sizes, n_floats):
    """`_send_all`: int64 arrays (any sizes, odd ones included) and a float32 one as one host-to-device copy; each
    view holds exactly its array and starts 16 bytes apart from the copy's start (a kernel taking it compiles once)."""
    import numpy as np

    from blend.fusor import _send_all

    rng = np.random.default_rng(0)
    ints = [rng.integers(-5, 10_000, size).astype(np.int64) for size in sizes]
    ints[0] = ints[0].reshape(1, -1)  # shapes are kept
    floats = None if n_floats is None else np.array([np.nan, np.inf, -np.inf, 3.5, -0.0, 1e-30, 7.25][:n_floats],
                                                    dtype=np.float32)
    views, sent_floats = _send_all("cpu", ints, floats)
    base = views[0].untyped_storage().data_ptr()
    for view, array in zip(views, ints):
        assert view.dtype == torch.int64 and tuple(view.shape) == array.shape
        assert np.array_equal(view.numpy(), array)
        assert (view.data_ptr() - base) % 16 == 0
    if floats is None:
        assert sent_floats is None
    else:
        assert sent_floats.dtype == torch.float32 and (sent_floats.data_ptr() - base) % 16 == 0
        assert np.array_equal(sent_floats.numpy(), floats, equal_nan=True)


@pytest.mark.parametrize("mode, ratio, first", [("blend", 0.05, 4), ("blend", 0.15, None), ("blend", 0.5, None),
                                                ("reuse", 0.15, None), ("prefix", 0.15, None)])
def test_the_fusor_asks_for_more_first_layers_only_where_blend_is_bound_by_its_copies(tiny, monkeypatch, mode, ratio,
                                                                                    first):
    """`into`'s `first`: the card's COPY_BOUND_FIRST where blend recomputes less than PLACE_ASIDE_FROM of the tokens,
    else the source's own choice (None)."""
    from blend import fusor

    monkeypatch.setattr(fusor, "PLACE_ASIDE_FROM", 0.15)
    monkeypatch.setattr(fusor, "COPY_BOUND_FIRST", {"Tuned card": 4})
    monkeypatch.setattr(fusor, "_card_name", lambda device: "Tuned card")  # (this CPU stands in for one)
    asked = []

    class Recording(MemorySource):
        def into(self, data, starts, device_too=True, first=None):
            asked.append((device_too, first))
            return super().into(data, starts, device_too, first)

    layout = random_layout(seed=5)
    prefix = compute_kv(tiny, layout.prefix)
    chunks = [compute_kv(tiny, ids, behind=prefix) for ids in layout.chunks]
    config = BlendConfig(mode=mode, ratio=ratio)
    with torch.inference_mode():
        prefill(tiny, layout, config, Recording(cached_entries(mode, prefix, chunks, layout)))
    assert asked == [(mode == "blend" and ratio >= 0.15, first)]


def test_a_card_without_a_tuned_count_and_a_cpu_leave_the_first_layers_to_the_source(monkeypatch):
    from blend import fusor

    monkeypatch.setattr(fusor, "COPY_BOUND_FIRST", {"Tuned card": 4})
    assert fusor._copy_bound_first(torch.device("cpu")) is None  # (no card name off CUDA)
    monkeypatch.setattr(fusor, "_card_name", lambda device: "Other card")
    assert fusor._copy_bound_first(torch.device("cpu")) is None
    monkeypatch.setattr(fusor, "_card_name", lambda device: "Tuned card")
    assert fusor._copy_bound_first(torch.device("cpu")) == 4
