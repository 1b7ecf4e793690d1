"""Facts about blend's token selectors: deviation and query-aware scores, sinks, groups, adaptive budgets."""

import pytest
import torch

from blend.fusor import BlendConfig, MemorySource, cached_entries, compute_kv, prefill
from blend.selectors import Selector, parse_selector, question_attention, token_scores
from tests.helpers.model import random_layout

EVERY_SELECTOR = ["k", "v", "qattn", "k*qattn", "qattn+sink4", "qattn+gmax", "k*qattn+sink2+gmax",
                  "qattn+cover0.8", "k*qattn+sink4+cover0.9+floor0.5", "qattn+sink4+nofirst",
                  "qattn+nofirst+cover0.8"]


def _run(step, layout, config):
    prefix = compute_kv(step, layout.prefix)
    chunks = [compute_kv(step, ids, behind=prefix) for ids in layout.chunks]
    source = MemorySource(cached_entries(config.mode, prefix, chunks, layout))
    with torch.inference_mode():
        return prefill(step, layout, config, source if config.mode != "full" else None)


@pytest.mark.parametrize("selector", EVERY_SELECTOR)
@pytest.mark.parametrize("gradual", [0, 2])
def test_every_selector_at_ratio_one_reproduces_full(tiny, selector, gradual):
    layout = random_layout(seed=11)
    full = _run(tiny, layout, BlendConfig(mode="full"))
    blend = _run(tiny, layout, BlendConfig(mode="blend", ratio=1.0, selector=selector, gradual_layers=gradual))
    assert (blend.logits - full.logits).abs().max() < 1e-4
    assert blend.recomputed == sum(map(len, layout.chunks))


@pytest.mark.parametrize("selector", EVERY_SELECTOR)
def test_every_selector_at_ratio_zero_matches_reuse(tiny, selector):
    layout = random_layout(seed=12)
    reuse = _run(tiny, layout, BlendConfig(mode="reuse"))
    blend = _run(tiny, layout, BlendConfig(mode="blend", ratio=0.0, selector=selector))
    assert blend.recomputed == 0
    assert (blend.logits - reuse.logits).abs().max() < 1e-5
    chunk_end = len(layout) - len(layout.suffix)
    assert torch.equal(blend.cache.data[1:, :chunk_end], reuse.cache.data[1:, :chunk_end])


@pytest.mark.parametrize("selector", ["qattn", "k*qattn", "qattn+sink4", "qattn+gmax"])
def test_fixed_budget_is_honoured_and_changes_the_answer_logits(tiny, selector):
    layout = random_layout(seed=13, chunk_lengths=(20, 20, 20))
    blend = _run(tiny, layout, BlendConfig(mode="blend", ratio=0.25, selector=selector))
    assert blend.recomputed == round(0.25 * 60)
    reuse = _run(tiny, layout, BlendConfig(mode="reuse"))
    assert (blend.logits - reuse.logits).abs().max() > 1e-4


def _recomputed_positions(tiny, layout, config) -> set[int]:
    """Chunk positions whose check-layer K differs from reuse's (fresh K, not the placed cache)."""
    blend, reuse = _run(tiny, layout, config), _run(tiny, layout, BlendConfig(mode="reuse"))
    drift = (blend.cache.data[config.check_layer, :, 0] - reuse.cache.data[config.check_layer, :, 0]).abs()
    return set(torch.nonzero(drift.amax(dim=(1, 2)) > 1e-6).flatten().tolist())


def test_sinks_spend_the_budget_on_the_first_tokens_of_every_chunk(tiny):
    layout = random_layout(seed=14, chunk_lengths=(20, 20, 20))
    starts = layout.chunk_starts()
    changed = _recomputed_positions(tiny, layout, BlendConfig(mode="blend", ratio=0.25, selector="qattn+sink3"))
    # Chunk 0 sits behind the prefix as it was computed: its fresh K equals its cache, so it cannot show.
    for start in starts[1:]:
        assert set(range(start, start + 3)) <= changed
    plain = _recomputed_positions(tiny, layout, BlendConfig(mode="blend", ratio=0.25, selector="qattn"))
    assert not all(set(range(s, s + 3)) <= plain for s in starts[1:])


def test_nofirst_spends_the_budget_on_the_chunks_whose_cache_is_stale(tiny):
    layout = random_layout(seed=16, chunk_lengths=(20, 20, 20))
    stale = set(range(layout.chunk_starts()[1], len(layout) - len(layout.suffix)))
    ratio = 40 / 60  # exactly the tokens of chunks 1 and 2
    config = BlendConfig(mode="blend", ratio=ratio, selector="qattn+sink4+nofirst")
    assert _recomputed_positions(tiny, layout, config) == stale
    plain = BlendConfig(mode="blend", ratio=ratio, selector="qattn+sink4")
    assert _recomputed_positions(tiny, layout, plain) < stale


def test_adaptive_budget_stays_between_floor_and_ceiling(tiny):
    layout = random_layout(seed=15, chunk_lengths=(30, 30, 30))
    ceiling = round(0.4 * 90)

    def recomputed(selector):
        return _run(tiny, layout, BlendConfig(mode="blend", ratio=0.4, selector=selector)).recomputed

    assert recomputed("qattn+cover0.01+floor0.5") == round(0.5 * ceiling)  # one token covers 1%: the floor
    assert recomputed("qattn+cover1") == ceiling  # all of the mass: the ceiling
    middle = recomputed("qattn+cover0.5")
    assert round(0.25 * ceiling) <= middle <= ceiling
    assert recomputed("qattn+cover0.3") <= middle <= recomputed("qattn+cover0.7")


def _one_head_per_group(n_tokens=8, d=4):
    """q and k where the last (question) token's q points at key 2 and away from key 5."""
    k = torch.zeros(n_tokens, 1, d)
    k[:, 0, 0] = 0.1
    k[2, 0] = torch.tensor([4.0, 0, 0, 0])
    k[5, 0] = torch.tensor([-4.0, 0, 0, 0])
    q = torch.zeros(n_tokens, 1, d)
    q[-1, 0] = torch.tensor([2.0, 0, 0, 0])
    return q, k


def test_question_attention_ranks_an_attended_token_above_an_ignored_one():
    q, k = _one_head_per_group()
    mass = question_attention(q, k, torch.arange(8), n_question=1, scale=1.0)
    assert mass[2] > 0.9 and mass[5] < 1e-3
    assert mass.argmax() == 2 and mass.argmin() == 5


def test_question_attention_is_causal_and_a_softmax_per_head_and_question_token():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(10, 4, 8, generator=g), torch.randn(10, 2, 8, generator=g)
    positions = torch.tensor([6, 7, 9, 11, 12, 13, 14, 20, 21, 22])
    mass = question_attention(q, k, positions, n_question=3, scale=0.35)
    assert mass.sum() == pytest.approx(3 * 4, rel=1e-5)  # every question token x head spends 1
    # The last question token is seen only by itself; the one before by itself and the last.
    alone = question_attention(q[-1:], k, positions, n_question=1, scale=0.35)
    assert mass[-1] == pytest.approx(float(alone[-1]), rel=1e-5)


def test_question_attention_shares_each_kv_head_with_its_query_group():
    """GQA: query heads 0-1 read KV head 0, heads 2-3 read KV head 1 (Hugging Face's repeat_interleave)."""
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(9, 4, 8, generator=g), torch.randn(9, 2, 8, generator=g)
    positions = torch.arange(9)
    keys = k.repeat_interleave(2, dim=1)
    logits = torch.einsum("qhd,thd->hqt", q[-3:], keys) * 0.5
    causal = positions[-3:, None] >= positions[None, :]
    expected = logits.masked_fill(~causal, float("-inf")).softmax(-1).sum(dim=(0, 1))
    assert torch.allclose(question_attention(q, k, positions, 3, 0.5), expected, atol=1e-5)


def test_group_max_keeps_a_token_one_group_needs_over_one_every_group_glances_at():
    n, d = 6, 4
    q = torch.zeros(n, 2, d)
    k = torch.zeros(n, 2, d)
    q[-1, :, 0] = 3.0
    k[1, 0, 0] = 1.06  # group 0 alone gives token 1 0.6 of its attention
    k[3, 0, 0] = 0.83  # group 0 gives token 3 0.3, group 1 gives it 0.5
    k[3, 1, 0] = 0.537
    summed = question_attention(q, k, torch.arange(n), 1, 1.0, "sum")
    maxed = question_attention(q, k, torch.arange(n), 1, 1.0, "max")
    assert summed[3] > summed[1] and maxed[1] > maxed[3]


def test_product_scorer_needs_both_drift_and_attention():
    q, k = _one_head_per_group()
    cached = torch.zeros(16, 2, 1, 4)
    positions = torch.arange(8)
    k_drift = k.clone()
    cached[:8, 0] = k
    cached[0, 0] += 5.0  # token 0 drifted far but the question barely looks at it
    cached[2, 0] += 0.5  # token 2 drifted a little and the question looks at it
    score, mass = token_scores(Selector("k*qattn"), q, k_drift, k_drift, cached, positions, 1, 1.0)
    drift_only, _ = token_scores(Selector("k"), q, k_drift, k_drift, cached, positions, 1, 1.0)
    assert drift_only.argmax() == 0 and score.argmax() == 2


@pytest.mark.parametrize(
    "spec,fields",
    [("k", Selector()), ("qattn+sink4", Selector("qattn", sinks=4)),
     ("k*qattn+gmax+cover0.9+floor0.5", Selector("k*qattn", groups="max", coverage=0.9, floor=0.5)),
     ("qattn+nofirst", Selector("qattn", skip_first=True))],
)
def test_selector_specs_parse(spec, fields):
    assert parse_selector(spec) == fields
    assert BlendConfig(selector=spec).label == f"blend@0.15/{spec}"


@pytest.mark.parametrize(
    "spec,named",
    [("q", "unknown selector 'q'"), ("qattn+sink", "'sink'"), ("qattn+cover1.5", "cover 1.5"),
     ("k+gmax", "needs an attention scorer"), ("qattn+floor0.5", "'qattn\\+floor0.5'"),
     ("qattn+", "option ''")],
)
def test_bad_selector_specs_name_the_value(spec, named):
    with pytest.raises(ValueError, match=named):
        BlendConfig(selector=spec)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec", ["k", "v", "qattn", "k*qattn+gmax"])
def test_scoring_never_waits_for_the_device(spec):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(64, h, 8, generator=g).cuda() for h in (4, 2, 2))
    cached = torch.randn(80, 2, 2, 8, generator=g).cuda()
    positions = torch.arange(10, 74, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        token_scores(parse_selector(spec), q, k, v, cached, positions, 5, 0.35)
    finally:
        torch.cuda.set_sync_debug_mode("default")
