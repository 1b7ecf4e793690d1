"""The loading controller on the request path: the running estimates it plans with, measured by this
server's own reads and prefills, and its plan for each blend request (blend.controller decides).

The tiers below the memory tiers (disk, Redis) are probed at start-up (`probe_tiers`); a tier not yet
measured is assumed to load in time (its chunks are read, and that read is the measurement); until a
prefill has been measured there is no plan at all.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass

import torch

from blend.controller import LoadPlan, plan_loading
from store.source import LoadStats
from store.tiered import TieredStore

log = logging.getLogger(__name__)

IN_PLACE = ("gpu", "memory", None)  # None: computed for this request, already on the device
MIN_SAMPLE_BYTES = 1 << 20  # reads smaller than this say more about latency than bandwidth


@dataclass(frozen=True)
class LoadingSummary:
    enabled: bool
    planned: int
    chunks_recomputed: int
    ratio_raised: int
    read_bytes_per_s: dict[str, float]
    prefill_s_per_token: float
    recompute_s_per_token: float = 0.0  # blend requests' compute per recomputed token (0: none measured yet)


class LoadEstimates:
    """Thread-safe: requests report from the model thread, Stats reads from any."""

    def __init__(self, n_layers: int, enabled: bool = True, smoothing: float = 0.3):
        self.n_layers = n_layers
        self.enabled = enabled
        self.smoothing = smoothing
        self._lock = threading.Lock()
        self._bandwidth: dict[str, float] = {}  # tier -> bytes/s, host read and device copy together
        self._copy_bandwidth: float | None = None  # host -> device, bytes/s (CUDA)
        self._s_per_token_layer: float | None = None
        self._blend_s_per_token_layer: float | None = None  # blend requests' compute per recomputed token-layer
        self.planned = self.chunks_recomputed = self.ratio_raised = 0

    def _blend(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.smoothing) * old + self.smoothing * new

    def observe_prefill(self, token_layers: int, seconds: float) -> None:
        """A prefill that computed `token_layers` (tokens x layers) in `seconds` of compute."""
        if token_layers > 0 and seconds > 0:
            with self._lock:
                self._s_per_token_layer = self._blend(self._s_per_token_layer, seconds / token_layers)

    def observe_blend(self, token_layers: int, seconds: float) -> None:
        """A blend prefill that recomputed `token_layers` (its recomputed and question tokens x layers) in
        `seconds` of compute: the recompute cost the plan matches to load time (full prefill's rate per token
        underestimates it several-fold at a small ratio)."""
        if token_layers > 0 and seconds > 0:
            with self._lock:
                self._blend_s_per_token_layer = self._blend(self._blend_s_per_token_layer, seconds / token_layers)

    def observe_loads(self, stats: LoadStats) -> None:
        with self._lock:
            if stats.copy_bytes >= MIN_SAMPLE_BYTES and stats.copy_s > 0:
                self._copy_bandwidth = self._blend(self._copy_bandwidth, stats.copy_bytes / stats.copy_s)
            for tier, seconds in stats.read_s.items():
                size = stats.read_bytes.get(tier, 0)
                if tier in IN_PLACE or size < MIN_SAMPLE_BYTES or seconds <= 0:
                    continue
                self._bandwidth[tier] = self._blend(self._bandwidth.get(tier), size / seconds)

    def bandwidth(self, tier: str | None, on_device: bool) -> float:
        """Bytes/s a chunk in `tier` arrives at: its read, then (on a GPU) its copy to the device."""
        if tier in IN_PLACE:
            return float("inf")
        with self._lock:
            read, copy = self._bandwidth.get(tier), self._copy_bandwidth if on_device else None
        seconds_per_byte = (1 / read if read else 0.0) + (1 / copy if copy else 0.0)
        return 1 / seconds_per_byte if seconds_per_byte else float("inf")

    def plan(self, tiers: list[str | None], tokens: list[int], bytes_per_token: int, floor: float,
             on_device: bool) -> LoadPlan | None:
        """Chunk i sits in `tiers[i]` and has `tokens[i]` tokens; None while no prefill was measured."""
        with self._lock:
            per_token_layer, blend_per_token_layer = self._s_per_token_layer, self._blend_s_per_token_layer
        if not self.enabled or per_token_layer is None or not tokens:
            return None
        plan = plan_loading(tokens, [self.bandwidth(t, on_device) for t in tiers], bytes_per_token,
                            per_token_layer * self.n_layers, self.n_layers, floor,
                            None if blend_per_token_layer is None else blend_per_token_layer * self.n_layers)
        with self._lock:
            self.planned += 1
            self.chunks_recomputed += len(plan.recompute_chunks)
            self.ratio_raised += plan.ratio > floor
        return plan

    def summary(self) -> LoadingSummary:
        with self._lock:
            rates = dict(self._bandwidth)
            if self._copy_bandwidth:
                rates["host_to_device"] = self._copy_bandwidth
            per_layer, blend_per_layer = self._s_per_token_layer, self._blend_s_per_token_layer
            return LoadingSummary(self.enabled, self.planned, self.chunks_recomputed, self.ratio_raised, rates,
                                  0.0 if per_layer is None else per_layer * self.n_layers,
                                  0.0 if blend_per_layer is None else blend_per_layer * self.n_layers)


def probe_tiers(tiered: TieredStore, estimates: LoadEstimates, value_bytes: int = 2 << 20, count: int = 4) -> dict[str, float]:
    """Seed the read rate of each tier below the memory tiers (disk, Redis) before the first request:
    `count` values of `value_bytes` written under fresh probe keys, read back as one batch (as a request
    reads a layer of its chunks), deleted. Without it a server's first request reads chunks that are only
    in Redis whatever Redis's speed (on an H200, 2x full prefill's time), since an unmeasured tier is
    assumed to load in time. Returns the rates measured, bytes/s; a tier that is down or fails is skipped."""
    measured: dict[str, float] = {}
    value = torch.randn(value_bytes // 4, generator=torch.Generator().manual_seed(0))
    for tier in tiered.tiers:
        if tier.name in IN_PLACE or tier.name == "cpu" or not getattr(tier, "available", True):
            continue
        keys = [f"probe-{uuid.uuid4().hex}:{index}" for index in range(count)]
        try:
            if any(tier.put(key, value) is None for key in keys):
                continue
            started = time.perf_counter()
            values = tier.get_many(keys)
            seconds = time.perf_counter() - started
            if seconds > 0 and all(isinstance(v, torch.Tensor) for v in values):
                size = count * value.numel() * value.element_size()
                estimates.observe_loads(LoadStats(read_s={tier.name: seconds}, read_bytes={tier.name: size}))
                measured[tier.name] = size / seconds
        except Exception as err:  # noqa: BLE001 - a probe never stops the server; requests measure later
            log.warning("loading controller: probing tier %s failed (%s); its rate is measured by requests", tier.name, err)
        finally:
            for key in keys:
                try:
                    tier.delete(key)
                except Exception:  # noqa: BLE001 - best effort: a probe key left behind is only bytes
                    pass
    return measured
