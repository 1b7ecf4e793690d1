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
