"""`+cachedk` (issue 16): blend ranks the check layer on the chunk tokens' cached K, so the layers before it
run for the question and the chunks prefilled in full alone, and the kept tokens catch up once chosen.
Every kept token is computed exactly as without the option; only the ranking's keys differ."""

import pytest
from tests.helpers.model import random_layout

from blend import fusor
from blend.fusor import BlendConfig, MemorySource, compute_kv, prefill
from services.bench.probe_cached_scores import cached_key_scores

LAYOUTS = ((1, (9, 14, 11)), (2, (20, 7, 16, 12)), (3, (30,)))


def _cached(step, layout):
    prefix = compute_kv(step, layout.prefix)
    return prefix, [compute_kv(step, ids, behind=prefix) for ids in layout.chunks]


def _source(prefix, chunks, skip=()):
    return MemorySource([prefix, *[None if i in skip else c for i, c in enumerate(chunks)]])


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.5])
def test_it_computes_what_the_one_pass_step_computes_when_that_ranks_on_the_cached_keys(tiny, monkeypatch, ratio):
    """The two-pass step (fixed positions first, the kept ones caught up) against the one-pass step over
    every token with its ranking given the same cached keys: the same recompute count and logits within
    float32 rounding, on three layouts."""
    for seed, lengths in LAYOUTS:
        layout = random_layout(seed, lengths)
        prefix, chunks = _cached(tiny, layout)
        fast = prefill(tiny, layout, BlendConfig("blend", ratio, 1, "qattn+sink2+nofirst+cachedk"),
                       _source(prefix, chunks))
        with monkeypatch.context() as patch:
            patch.setattr(fusor, "token_scores", cached_key_scores)  # the probe's ranking on cached keys
            slow = prefill(tiny, layout, BlendConfig("blend", ratio, 1, "qattn+sink2+nofirst"),
                           _source(prefix, chunks))
        assert fast.recomputed == slow.recomputed > 0
        assert (fast.logits - slow.logits).abs().max() < 1e-4


def test_at_ratio_one_it_is_full_prefill_and_at_zero_it_is_reuse(tiny):
    """Every chunk token kept: the exact prompt (full prefill's logits); none kept: the question alone over
    the placed cache (reuse's)."""
    layout = random_layout(2, (20, 7, 16, 12))
    prefix, chunks = _cached(tiny, layout)
    full = prefill(tiny, layout, BlendConfig("full"), None).logits
    every = prefill(tiny, layout, BlendConfig("blend", 1.0, selector="qattn+cachedk"), _source(prefix, chunks))
    assert every.recomputed == sum(map(len, layout.chunks))
    assert (every.logits - full).abs().max() < 1e-4
    reuse = prefill(tiny, layout, BlendConfig("reuse"), _source(prefix, chunks)).logits
    none = prefill(tiny, layout, BlendConfig("blend", 0.0, selector="qattn+cachedk"), _source(prefix, chunks))
    assert none.recomputed == 0 and (none.logits - reuse).abs().max() < 1e-4


def test_chunks_prefilled_in_full_run_with_the_question_before_the_check_layer(tiny):
    """A chunk the loading controller recomputes instead of loading has no placed K/V: it runs from layer 0
    with the question; at ratio 1 the result is still full prefill's."""
    layout = random_layout(2, (20, 7, 16, 12))
    prefix, chunks = _cached(tiny, layout)
    full = prefill(tiny, layout, BlendConfig("full"), None).logits
    for skip in ([1], [0, 3]):
        every = prefill(tiny, layout, BlendConfig("blend", 1.0, selector="qattn+cachedk"),
                        _source(prefix, chunks, skip), recompute=skip)
        assert (every.logits - full).abs().max() < 1e-4
        some = prefill(tiny, layout, BlendConfig("blend", 0.25, selector="qattn+cachedk"),
                       _source(prefix, chunks, skip), recompute=skip)
        assert some.recomputed >= sum(len(layout.chunks[i]) for i in skip)


def test_it_needs_the_question_attention_scorer_and_one_check_at_layer_one():
    """Layer 0's K/V are a token's own, so only with the check at layer 1 is every kept token computed as
    without the option; a later or gradual check is refused by name."""
    with pytest.raises(ValueError, match="needs the qattn scorer"):
        BlendConfig("blend", 0.15, selector="k+cachedk")
    with pytest.raises(ValueError, match="gradual_layers 3"):
        BlendConfig("blend", 0.15, selector="qattn+cachedk", gradual_layers=3)
    with pytest.raises(ValueError, match="check_layer 2"):
        BlendConfig("blend", 0.15, check_layer=2, selector="qattn+cachedk")


class _Recording(MemorySource):
    """A memory source that records the fusor's calls: ("layer", i) and "ahead"."""

    def __init__(self, entries):
        super().__init__(entries)
        self.calls = []

    def layer(self, index):
        self.calls.append(("layer", index))
        return super().layer(index)

    def ahead(self):
        self.calls.append("ahead")


@pytest.mark.parametrize(("selector", "early_ahead", "first_ahead"), [
    ("qattn+sink2+nofirst+cachedk", False, 1),  # the question-only layer 0 issues nothing more: the head's host
    ("qattn+sink2+nofirst+cachedk", True, 0),
    ("qattn+sink2+nofirst", False, 0),  # layer 0 over every token: `ahead` after it as after every layer
])
def test_with_cached_keys_the_source_is_asked_ahead_only_from_the_check_layer_on(tiny, monkeypatch, selector,
                                                                                 early_ahead, first_ahead):
    layout = random_layout(1, (9, 14, 11))
    prefix, chunks = _cached(tiny, layout)
    monkeypatch.setattr(fusor, "AHEAD_BEFORE_CHECK", early_ahead)
    source = _Recording([prefix, *chunks])
    prefill(tiny, layout, BlendConfig("blend", 0.3, 1, selector), source)
    expected = []
    for layer in range(tiny.n_layers):
        expected.append(("layer", layer))
        if layer >= first_ahead:
            expected.append("ahead")
    assert source.calls == expected
