"""Counters of the request path: cumulative ones (RPCs, the TTFT histogram) feed Prometheus, the
recent-TTFT window feeds the p50/p99 in Stats."""

from __future__ import annotations

import math
import threading
import time
from collections import deque

TTFT_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # upper bounds; +Inf follows


class Metrics:
    """Counters of the request path. Cumulative ones (RPCs, the TTFT histogram) feed Prometheus; the
    recent-TTFT window feeds the p50/p99 in Stats."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = self.completed = self.failed = self.cancelled = self.rejected = 0
        self.tokens_generated = 0
        self.decode_steps = self.decode_step_tokens = 0  # forwards run for decoding, and the tokens they fed
        self.decode_step_seconds = 0.0  # the model thread's time in them, each token's emit included
        self.ttfts: deque[float] = deque(maxlen=1000)
        self.ttft_counts = [0] * (len(TTFT_BUCKETS_S) + 1)  # per bucket, not cumulative; last is +Inf
        self.ttft_sum = 0.0
        self.rpcs: dict[tuple[str, str], int] = {}  # (method, status code name) -> calls ended so far
        self.started = time.monotonic()

    def rpc(self, method: str, code: str) -> None:
        """One call of `method` ended with status `code` ("OK", "UNAVAILABLE", ...)."""
        with self._lock:
            self.rpcs[method, code] = self.rpcs.get((method, code), 0) + 1

    def admitted(self) -> None:
        with self._lock:
            self.requests += 1

    def reject(self) -> None:
        with self._lock:
            self.rejected += 1

    def token(self) -> None:
        with self._lock:
            self.tokens_generated += 1

    def decoded(self, batch: int, seconds: float = 0.0) -> None:
        """One decode step fed `batch` requests' tokens (batched decode: their mean is the batch size) in
        `seconds` of the model thread (the step and its tokens' emits: against the time between a request's
        tokens, what is spent outside the step)."""
        with self._lock:
            self.decode_steps += 1
            self.decode_step_tokens += batch
            self.decode_step_seconds += seconds

    def first_token(self, ttft: float) -> None:
        bucket = next((i for i, bound in enumerate(TTFT_BUCKETS_S) if ttft <= bound), len(TTFT_BUCKETS_S))
        with self._lock:
            self.ttfts.append(ttft)
            self.ttft_counts[bucket] += 1
            self.ttft_sum += ttft

    def snapshot(self) -> dict:
        """The cumulative counters at one instant (for an exporter)."""
        with self._lock:
            return {"rpcs": dict(self.rpcs), "ttft_counts": list(self.ttft_counts), "ttft_sum": self.ttft_sum,
                    "requests": self.requests, "completed": self.completed, "failed": self.failed,
                    "cancelled": self.cancelled, "rejected": self.rejected,
                    "tokens_generated": self.tokens_generated, "decode_steps": self.decode_steps,
                    "decode_step_tokens": self.decode_step_tokens, "decode_step_seconds": self.decode_step_seconds}

    def ended(self, cancelled: bool = False, failed: bool = False) -> None:
        with self._lock:
            if cancelled:
                self.cancelled += 1
            elif failed:
                self.failed += 1
            else:
                self.completed += 1

    def ttft_percentiles(self) -> tuple[float, float]:
        with self._lock:
            values = sorted(self.ttfts)
        if not values:
            return 0.0, 0.0
        return values[len(values) // 2], values[min(len(values) - 1, math.ceil(0.99 * len(values)) - 1)]
