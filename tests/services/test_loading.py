"""The loading controller on the request path: it plans only from what this server measured, never
goes under the request's ratio, recomputes chunks whose tier is slower to read than to recompute,
and never recomputes a chunk that is already on the device."""

from __future__ import annotations

import pytest

from services.serving.loading import LoadEstimates
from store.source import LoadStats

LAYERS = 32
BYTES_PER_TOKEN = 128 * 1024  # Llama-3-8B shape, bf16
TOKENS = [512] * 4


def measured(redis_bytes_per_s: float = 0.5e9, copy_bytes_per_s: float = 50e9) -> LoadEstimates:
    estimates = LoadEstimates(LAYERS)
    estimates.observe_prefill(5000 * LAYERS, 0.160)  # 8B full prefill on an H200: ~32 us per token
    size = 64 << 20
    estimates.observe_loads(LoadStats(read_s={"redis": size / redis_bytes_per_s}, read_bytes={"redis": size},
                                      copy_bytes=size, copy_s=size / copy_bytes_per_s))
    return estimates


def test_no_plan_before_any_prefill_was_measured_and_none_when_switched_off():
    assert LoadEstimates(LAYERS).plan(["cpu"] * 4, TOKENS, BYTES_PER_TOKEN, 0.15, True) is None
    off = measured()
    off.enabled = False
    assert off.plan(["cpu"] * 4, TOKENS, BYTES_PER_TOKEN, 0.15, True) is None


def test_chunks_in_a_slow_tier_are_recomputed_and_the_others_loaded_at_the_requested_ratio():
    plan = measured().plan(["cpu", "redis", "cpu", "redis"], TOKENS, BYTES_PER_TOKEN, 0.15, True)
    assert plan.recompute_chunks == (1, 3) and plan.ratio == pytest.approx(0.15)


def test_the_ratio_is_never_below_the_request_and_device_resident_chunks_are_never_recomputed():
    estimates = measured(redis_bytes_per_s=1e6)
    plan = estimates.plan(["gpu", "memory", None, "gpu"], TOKENS, BYTES_PER_TOKEN, 0.3, True)
    assert plan.recompute_chunks == () and plan.ratio >= 0.3
    assert estimates.bandwidth("gpu", True) == float("inf")


def test_estimates_come_from_measured_reads_and_small_reads_are_ignored():
    estimates = measured(redis_bytes_per_s=0.5e9)
    assert estimates.bandwidth("redis", on_device=False) == pytest.approx(0.5e9)
    # On a GPU the chunk also crosses to the device: both costs add up.
    assert estimates.bandwidth("redis", on_device=True) == pytest.approx(1 / (1 / 0.5e9 + 1 / 50e9))
    estimates.observe_loads(LoadStats(read_s={"redis": 1.0}, read_bytes={"redis": 1000}))  # latency, not bandwidth
    assert estimates.bandwidth("redis", on_device=False) == pytest.approx(0.5e9)
    summary = estimates.summary()
    assert summary.prefill_s_per_token == pytest.approx(0.160 / 5000)
    assert summary.read_bytes_per_s["redis"] == pytest.approx(0.5e9)


def test_blend_requests_teach_the_plan_their_own_recompute_cost():
    """Until a blend request was measured the plan prices recompute at full prefill's rate; after, at blend's
    own (seconds per recomputed token-layer), which a small recompute set pays several times over."""
    estimates = measured()
    before = estimates.plan(["cpu"] * 10, [512] * 10, BYTES_PER_TOKEN, 0.05, True)
    assert before.ratio > 0.05 and estimates.summary().recompute_s_per_token == 0.0
    estimates.observe_blend(290 * LAYERS, 0.018)
    after = estimates.plan(["cpu"] * 10, [512] * 10, BYTES_PER_TOKEN, 0.05, True)
    assert after.ratio == pytest.approx(0.05)
    assert after.recompute_s == pytest.approx(0.05 * 5120 * 0.018 / 290)
    assert estimates.summary().recompute_s_per_token == pytest.approx(0.018 / 290)
