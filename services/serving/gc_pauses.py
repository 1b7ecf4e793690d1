"""The server process's Python garbage collector: what start-up made is frozen, and every collection's pause counted.

Once `Engine.open` has loaded the model, tokenizer and retriever (SmolLM2, the default), the collector tracks ~406,000
objects, and a full collection walks all of them: ~180 ms on the 2-core CPU (`python3 -m services.bench.probe_gc`,
docs/ops/cpu_probe_gc_s21.txt). Whichever thread allocates past the threshold runs it and waits it out, a request's
TTFT with it (a served blend request takes ~16 ms on an H200). Those objects live as long as the process: `serve`
moves them out of the collector's reach once start-up is done (`freeze_start_up`, `gc.freeze`), so a full collection
walks only what came after (0.0 ms in the same probe). The pauses left are counted per generation (`Pauses`) for the
metrics (`kvblend_gc_pause_seconds`, `kvblend_gc_longest_pause_seconds`).
"""
from __future__ import annotations

import gc
import threading
import time

GENERATIONS = 3


def freeze_start_up() -> int:
    """Collect once (start-up's garbage goes), then freeze what is left; returns how many objects are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class Pauses:
    """Collections and their pause seconds per generation, and the longest pause, from `gc.callbacks` while open."""

    def __init__(self):
        self._lock = threading.Lock()
        self.collections = [0] * GENERATIONS
        self.seconds = [0.0] * GENERATIONS
        self.longest = 0.0
        self._began: float | None = None  # (one collection runs at a time: the collector holds the interpreter)
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._began = time.perf_counter()
            return
        began, self._began = self._began, None
        if began is None:  # opened mid-collection
            return
        took = time.perf_counter() - began
        generation = min(int(info.get("generation", GENERATIONS - 1)), GENERATIONS - 1)
        with self._lock:
            self.collections[generation] += 1
            self.seconds[generation] += took
            self.longest = max(self.longest, took)

    def snapshot(self) -> dict:
        with self._lock:
            return {"collections": list(self.collections), "seconds": list(self.seconds), "longest_s": self.longest,
                    "frozen": gc.get_freeze_count()}

    def close(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)
