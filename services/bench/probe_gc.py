"""Probe (not a result): what a full garbage collection costs in the served process, and after start-up's objects are
frozen as `kvblend serve` freezes them (services/serving/gc_pauses.py). Opens the engine as `serve` does (the default
model, SmolLM2, on this machine's device; a fresh data folder, no Redis), then times full collections before and
after `freeze_start_up`.
`python3 -m services.bench.probe_gc`
"""
from __future__ import annotations

import gc
import statistics
import tempfile
import time

from services.serving.engine import Engine
from services.serving.gc_pauses import freeze_start_up
from services.settings import from_flags


def _full_ms(rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        gc.collect()
        times.append(1e3 * (time.perf_counter() - started))
    return times


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        engine = Engine.open(from_flags({"data_dir": folder, "redis_url": None, "port": 0}))
        try:
            gc.collect()
            tracked = len(gc.get_objects())
            before = _full_ms(5)
            frozen = freeze_start_up()
            after = _full_ms(5)
            print(f"engine opened ({engine.model.step.device}): {tracked} objects tracked by the collector")
            print(f"a full collection: median {statistics.median(before):.1f} ms (min {min(before):.1f}) before the "
                  f"freeze; {frozen} objects frozen; then median {statistics.median(after):.1f} ms "
                  f"(max {max(after):.1f}) of 5")
        finally:
            engine.close()
            gc.unfreeze()


if __name__ == "__main__":
    main()
