"""Which tier served each chunk of one request: tiers wrapped so that a hit on a watched chunk is noted.

`TieredStore` answers a get without saying where the value came from; the per-request report needs
that, so each tier is wrapped in a `TracedTier` that tells a `TierTrace` about its hits. Only the
chunks of the request being prefilled are watched (one at a time: prefill runs on the model thread),
so ingestion's lookups never land in a request's report.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict

from store.keys import MANIFEST, chunk_of


class TierTrace:
    def __init__(self, tier_names: list[str]):
        self.order = {name: index for index, name in enumerate(tier_names)}
        self._lock = threading.Lock()
        self._watched: set[str] = set()
        self._tiers: dict[str, set[str]] = defaultdict(set)  # chunk key -> tiers its layers came from
        self._load_s = 0.0

    def watch(self, chunk_keys) -> None:
        with self._lock:
            self._watched = set(chunk_keys)
            self._tiers.clear()
            self._load_s = 0.0

    def finish(self) -> tuple[dict[str, str], float]:
        """Stop watching; (chunk key -> the slowest tier any of its layers came from, seconds in reads)."""
        with self._lock:
            slowest = {key: max(tiers, key=self.order.__getitem__) for key, tiers in self._tiers.items()}
            load_s = self._load_s
            self._watched = set()
            self._tiers.clear()
        return slowest, load_s

    def hit(self, tier: str, entry_key: str, seconds: float) -> None:
        chunk = chunk_of(entry_key)
        if chunk not in self._watched or entry_key.endswith(":" + MANIFEST):
            return
        with self._lock:
            if chunk in self._watched:
                self._tiers[chunk].add(tier)
                self._load_s += seconds


class TracedTier:
    """A tier that reports its hits to a trace; everything else passes through."""

    def __init__(self, tier, trace: TierTrace):
        self._tier = tier
        self._trace = trace
        self.name = tier.name
        self.volatile = tier.volatile

    def get(self, key: str):
        started = time.perf_counter()
        value = self._tier.get(key)
        if value is not None:
            self._trace.hit(self.name, key, time.perf_counter() - started)
        return value

    def __getattr__(self, name: str):
        return getattr(self._tier, name)

    @property
    def inner(self):
        return self._tier


def trace_tiers(tiered) -> TierTrace:
    """Wrap every tier of a `store.TieredStore` in place; returns the trace they report to."""
    trace = TierTrace([tier.name for tier in tiered.tiers])
    tiered.tiers = [TracedTier(tier, trace) for tier in tiered.tiers]
    return trace
