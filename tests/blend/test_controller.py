"""The loading controller matches recompute time to load time, within the quality floor."""

import pytest

from blend.controller import plan_loading

LAYERS = 32
PER_TOKEN = 32e-6  # s/token of full prefill, ~165 ms for 5,152 tokens (REFERENCE.md, H100)
BYTES = 131072  # K/V bytes per token of the 8B shape


def test_fast_tier_is_held_at_the_quality_floor():
    plan = plan_loading([512] * 10, [50e9] * 10, BYTES, PER_TOKEN, LAYERS, floor=0.15)
    assert plan.ratio == 0.15 and plan.recompute_chunks == () and "floor" in plan.reason


def test_slower_tier_raises_the_ratio_until_recompute_matches_load():
    plan = plan_loading([512] * 10, [5e9] * 10, BYTES, PER_TOKEN, LAYERS)
    assert 0.15 < plan.ratio < 1.0
    assert plan.recompute_s == pytest.approx(plan.load_s, rel=1e-6)


def test_chunk_that_loads_slower_than_it_computes_is_prefilled_instead():
    plan = plan_loading([512, 512, 64], [50e9, 50e9, 0.5e9], BYTES, PER_TOKEN, LAYERS)
    assert plan.recompute_chunks == (2,)


def test_nothing_worth_loading_means_full_prefill():
    plan = plan_loading([512] * 3, [0.1e9] * 3, BYTES, PER_TOKEN, LAYERS)
    assert plan.ratio == 1.0 and plan.recompute_chunks == (0, 1, 2)


def test_bad_inputs_name_the_value():
    with pytest.raises(ValueError, match="2 chunks but 1 bandwidths"):
        plan_loading([1, 2], [1e9], BYTES, PER_TOKEN, LAYERS)
    with pytest.raises(ValueError, match="floor 1.5"):
        plan_loading([1], [1e9], BYTES, PER_TOKEN, LAYERS, floor=1.5)


def test_with_blends_measured_recompute_cost_the_ratio_matches_load_at_that_cost():
    # 10 x 512 tokens from a 5 GB/s tier: 134 ms of loading. Blend's own measured cost, 64 us per recomputed
    # token (every layer): the ratio whose recompute takes as long is 134 ms / (5,120 x 64 us) = 0.41.
    plan = plan_loading([512] * 10, [5e9] * 10, BYTES, PER_TOKEN, LAYERS, floor=0.05, recompute_s_per_token=64e-6)
    assert plan.ratio == pytest.approx(plan.load_s / (5120 * 64e-6), rel=1e-3)
    assert plan.recompute_s == pytest.approx(plan.load_s, rel=1e-3)
    with pytest.raises(ValueError, match="recompute cost 0"):
        plan_loading([512], [5e9], BYTES, PER_TOKEN, LAYERS, recompute_s_per_token=0)


def test_a_recompute_that_already_outlasts_the_load_is_not_raised():
    """H200 (docs/gpu.md, eighth session): CPU tier at ~50 GB/s, 10 x 512 tokens, 13.4 ms of copies; full
    prefill's rate (~25 us/token) predicted blend@0.05 at ~10 ms and raised it (served: to 0.085-0.089, where it
    took ~30 ms); blend's measured ~18 ms for ~290 recomputed tokens (62 us/token) already covers the load."""
    from_full = plan_loading([512] * 10, [50e9] * 10, BYTES, 25.5e-6, LAYERS, floor=0.05)
    assert from_full.ratio > 0.07
    measured = plan_loading([512] * 10, [50e9] * 10, BYTES, 25.5e-6, LAYERS, floor=0.05,
                            recompute_s_per_token=0.018 / 290)
    assert measured.ratio == 0.05 and "floor" in measured.reason
